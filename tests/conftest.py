"""8 fake CPU devices for sharding tests; must run before jax is imported anywhere.

A persistent compilation cache shared by the whole session (subprocesses included) keeps
identical tiny-model programs from compiling twice.
"""
import os
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "pretrain_jax_test_jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

# Tests call config.configure directly; like the CLI, they register gin's configurables (and
# the SeqIO tasks) first. After the environment above: this imports JAX.
from pretrain_jax import registry  # noqa: E402,F401
