"""Decoders end to end: LM data and packing, training on 1 and 8 devices, GPT's finetuning
formats, finetuning from a pretrained run, in-context learning and the generate/icl verbs."""

import json
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import seqio
import tensorflow as tf

import helpers
from pretrain_jax.config import bound, configure
from pretrain_jax.data import corpora, pipeline, tasks, vocabularies  # tasks: registers them
from pretrain_jax.errors import UserError
from pretrain_jax.inference import decoding, in_context, loading
from pretrain_jax.objectives import classification
from pretrain_jax.training import metrics as metrics_lib, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["GptConfig.num_layers = 2", "GptConfig.hidden = 64", "GptConfig.num_heads = 4",
        "GptConfig.mlp_dim = 128", "GptConfig.max_positions = 64", "train.batch_size = 8",
        "train.sequence_length = 32", "train.log_every = 2", "train.eval_every = 6",
        "train.eval_batches = 2", "train.checkpoint_every = 100",
        "warmup_cosine_decay.warmup_steps = 2", "warmup_cosine_decay.learning_rate = 5e-3"]


def _train(model_dir, steps, *bindings, include=()):
  """Trains the tiny GPT (`include`: gin files layered over it before the tiny bindings)."""
  return helpers.train(model_dir, ["experiments/gpt_tiny_cpu.gin", *include],
                       TINY + [f"train.num_steps = {steps}", *bindings])


_losses = helpers.losses


# Data ---------------------------------------------------------------------------------------

def test_lm_chunks_keep_every_token_and_eos_only_at_the_document_end():
  task = seqio.get_mixture_or_task("bbc_lm")
  ds = task.get_dataset({"targets": 32}, split="validation", shuffle=False)
  vocab = vocabularies.bbc_sentencepiece()
  document = vocab.encode(corpora.bbc_articles("validation")[0]["text"]) + [vocab.eos_id]
  chunks = [c["targets"].tolist() for c in ds.take(-(-len(document) // 32)).as_numpy_iterator()]
  assert all(len(c) == 32 for c in chunks[:-1]) and 0 < len(chunks[-1]) <= 32
  assert sum(chunks, []) == document
  assert sum(c.count(vocab.eos_id) for c in chunks) == 1


def test_packed_rows_shift_per_document_and_weight_real_tokens():
  ds = seqio.get_dataset("bbc_lm", {"targets": 512}, _converter(), dataset_split="validation",
                         shuffle=False)
  rows = list(ds.take(40).as_numpy_iterator())
  packed = [r for r in rows if r["decoder_segment_ids"].max() > 1]
  assert packed, "some rows must hold more than one document"
  for r in rows:
    seg, inp, tgt = r["decoder_segment_ids"], r["decoder_input_tokens"], r["decoder_target_tokens"]
    np.testing.assert_array_equal(r["decoder_loss_weights"], seg > 0)
    for s in set(seg[seg > 0].tolist()):
      idx = np.flatnonzero(seg == s)
      assert inp[idx[0]] == 0  # each document opens with id 0 (BOS)
      np.testing.assert_array_equal(inp[idx[1:]], tgt[idx[:-1]])  # shifted right
      np.testing.assert_array_equal(r["decoder_positions"][idx], np.arange(len(idx)))


def _converter():
  gin.clear_config()
  configure(["objectives/causal_lm.gin"], [])
  return bound("train.feature_converter")


def test_gpt_format_single_and_pair_with_longest_first_truncation():
  vocab = vocabularies.bbc_sentencepiece()
  ids = classification.special_ids(vocab)
  assert ids == {"start": 8000, "delim": 8001, "extract": 8002}
  features = {"inputs": seqio.Feature(vocab)}
  examples = [{"inputs": list(range(10, 20)), "b": list(range(30, 33))},
              {"inputs": list(range(10, 60)), "b": list(range(70, 120))}]
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples), output_signature={k: tf.TensorSpec([None], tf.int32)
                                                for k in ("inputs", "b")})
  single = list(classification.gpt_format(ds, {"inputs": 16}, features).as_numpy_iterator())
  assert single[0]["inputs"].tolist() == [8000, *range(10, 20), 8002]
  assert single[1]["inputs"].tolist() == [8000, *range(10, 24), 8002]  # 16 tokens
  pair = list(classification.gpt_format(ds, {"inputs": 16}, features, fields=("inputs", "b"))
              .as_numpy_iterator())
  assert pair[0]["inputs"].tolist() == [8000, *range(10, 20), 8001, 30, 31, 32, 8002]  # fits
  # 13 tokens of text for 50 + 50: the longer is cut first, so they share it 7 / 6
  assert pair[1]["inputs"].tolist() == [8000, *range(10, 17), 8001, *range(70, 76), 8002]


def test_generative_finetuning_weights_only_the_target():
  gin.clear_config()
  configure(["objectives/causal_lm.gin"], ["feature_lengths.targets_length = 4"])
  lengths = pipeline.feature_lengths(48)
  assert lengths == {"inputs": 44, "targets": 4}
  ds = seqio.get_dataset("bbc_topic_gpt", lengths, bound("train.feature_converter"),
                         dataset_split="validation", shuffle=False)
  vocab = vocabularies.bbc_sentencepiece()
  topics = {a["topic"] for a in corpora.bbc_articles("validation")}
  for row in ds.take(6).as_numpy_iterator():
    weighted = row["decoder_target_tokens"][row["decoder_loss_weights"] > 0].tolist()
    assert weighted[-1] == vocab.eos_id
    assert vocab.decode(weighted[:-1]) in topics
    # the [EXTRACT] token sits right before the target, and carries no loss
    extract_at = row["decoder_target_tokens"].tolist().index(8002)
    assert row["decoder_loss_weights"][extract_at] == 0
    assert row["decoder_loss_weights"][extract_at + 1] == 1


# Training -------------------------------------------------------------------------------------

@pytest.mark.parametrize("model_gin", ["models/gpt_tiny.gin", "models/modern_decoder_tiny.gin"])
def test_one_device_equals_eight_sharded_devices_and_loss_falls(tmp_path, model_gin):
  single = _train(tmp_path / "one", 12, "make_mesh.num_devices = 1", include=[model_gin])
  sharded = _train(tmp_path / "eight", 12, "make_mesh.data = 2", "make_mesh.fsdp = 2",
                   "make_mesh.tensor = 2", include=[model_gin])
  print("1 device :", _losses(single))
  print("8 devices:", _losses(sharded))
  np.testing.assert_allclose(_losses(single), _losses(sharded), rtol=2e-4)
  held_out = [r["perplexity"] for r in single if r["split"] == "validation"]
  np.testing.assert_allclose(held_out, [r["perplexity"] for r in sharded
                                        if r["split"] == "validation"], rtol=2e-4)
  assert held_out[-1] < 0.5 * held_out[0], "held-out perplexity must fall"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  model_dir = tmp_path_factory.mktemp("gpt") / "pretrained"
  _train(model_dir, 10)
  return model_dir


def test_classifier_finetuning_starts_from_the_pretrained_decoder(pretrained, tmp_path, capsys):
  records = _train(tmp_path / "clf", 4, f"train.init_from = '{pretrained}'",
                   "warmup_linear_decay.learning_rate = 0.0", "train.checkpoint_every = 4",
                   "train.eval_every = 4", "train.sequence_length = 32",
                   include=["experiments/gpt_tiny_bbc_classifier.gin"])
  assert "newly initialised: classifier/bias, classifier/kernel" in capsys.readouterr().out
  assert {"accuracy", "classifier_loss", "lm_loss"} <= set(records[-1])
  # learning rate 0: the finetuned run's decoder is exactly the pretrained one
  tuned, _, _ = loading.load(str(tmp_path / "clf"))
  gin.clear_config()
  configure([str(pretrained / "config.gin")], [])
  base, _, _ = loading.load(str(pretrained))
  np.testing.assert_array_equal(tuned.layers.block.mlp.wo.kernel[1],
                                base.layers.block.mlp.wo.kernel[1])
  np.testing.assert_array_equal(tuned.token_embed.embedding[...], base.token_embed.embedding[...])


def test_final_token_classifier_reads_the_last_real_token(pretrained, tmp_path):
  gin.clear_config()
  configure(["experiments/gpt_tiny_cpu.gin", "experiments/gpt_tiny_bbc_classifier.gin"],
            TINY + ["train.sequence_length = 32"])
  model = bound("train.model")(0)
  tokens = np.array([[8000, 11, 12, 13, 8002, 0, 0, 0], [8000, 11, 12, 13, 8002, 0, 0, 0]])
  other = tokens.copy()
  other[1, :4] = [8000, 21, 22, 23]
  probs = np.asarray(classification.predict(model, jnp.asarray(other)))
  assert probs.shape == (2, 5)
  np.testing.assert_allclose(probs.sum(1), 1, rtol=1e-5)
  assert not np.allclose(probs[0], probs[1])  # the earlier tokens reach [EXTRACT]
  batch = {"tokens": jnp.asarray(tokens), "label": jnp.asarray([0, 3])}
  loss, metrics = classification.final_token_classifier_loss(model, batch, lm_weight=0.0)
  expected = -np.log(np.asarray(classification.predict(model, jnp.asarray(tokens)))[[0, 1], [0, 3]])
  np.testing.assert_allclose(float(loss), expected.mean(), rtol=1e-5)


# In-context learning ------------------------------------------------------------------------------

def test_template_renders_the_seed_format():
  template = in_context.Template("{inputs} -> {targets}", "\n")
  prompt, space = template.prompt([("sea otter", "loutre de mer"), ("cheese", "fromage")],
                                  "thanks")
  assert prompt == "sea otter -> loutre de mer\ncheese -> fromage\nthanks ->"
  assert space == " "
  with pytest.raises(UserError, match="must end with"):
    in_context.Template("{targets} <- {inputs}")


def test_scores_are_the_summed_log_likelihoods_and_classification_takes_the_best(pretrained):
  gin.clear_config()
  configure([str(pretrained / "config.gin")], [])
  model, vocab, _ = loading.load(str(pretrained))
  contexts = [[0, 45, 46, 47], [0, 9], [0, 300, 301, 302, 303, 304]]
  continuations = [[48, 49], [10, 11, 12], [305]]
  scores = decoding.score(model, contexts, continuations)
  for c, t, s in zip(contexts, continuations, scores):
    log_probs = jax.nn.log_softmax(model(jnp.asarray([c + t]))[0].astype(jnp.float32), -1)
    expected = sum(float(log_probs[len(c) - 1 + i, tok]) for i, tok in enumerate(t))
    np.testing.assert_allclose(s, expected, rtol=1e-4, atol=1e-4)
  result = in_context.evaluate(model, vocab, "bbc_topic", shots=2, num_examples=3)
  labels = sorted({a["topic"] for a in corpora.bbc_articles("train")})
  assert result["examples"] == 3 and set(result["predictions"]) <= set(labels)
  assert result["chance"] == pytest.approx(1 / 5)
  # Contextual calibration, zero-shot, recomputed by hand for the first query
  calibrated = in_context.evaluate(model, vocab, "bbc_topic", shots=0, num_examples=2,
                                   calibrate=True)
  template = in_context.Template()
  inputs = in_context.task_examples("bbc_topic", "validation")[0][0]
  prompt, space = template.prompt([], inputs)
  free, _ = template.prompt([], "N/A")
  raw = in_context._label_scores(model, vocab, [prompt], [space], labels)[0]  # pylint: disable=protected-access
  bias = in_context._label_scores(model, vocab, [free], [space], labels)[0]  # pylint: disable=protected-access
  bias = bias - np.logaddexp.reduce(bias)
  assert calibrated["predictions"][0] == labels[int(np.argmax(raw - bias))]


# The verbs ------------------------------------------------------------------------------------

def _cli(*args):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", "pretrain_jax", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_generate_and_icl_verbs(pretrained, tmp_path):
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("The government said\nShares in\n")
  run = _cli("generate", f"--model_dir={pretrained}", f"--prompt_file={prompts}",
             "--prompt=Wales beat", "--max_new_tokens=5", "--json")
  assert run.returncode == 0, run.stderr
  rows = [json.loads(line) for line in run.stdout.splitlines()]
  assert [r["prompt"] for r in rows] == ["Wales beat", "The government said", "Shares in"]
  assert all(0 < len(r["tokens"]) <= 5 for r in rows) and rows[0]["step"] == 10
  sampled = _cli("generate", f"--model_dir={pretrained}", "--prompt=Wales beat",
                 "--temperature=0.8", "--top_k=40", "--top_p=0.9", "--max_new_tokens=5")
  assert sampled.returncode == 0 and sampled.stdout.startswith("Wales beat ▸"), sampled.stderr
  icl = _cli("icl", f"--model_dir={pretrained}", "--task=bbc_topic", "--shots=1", "--num=4",
             "--json")
  assert icl.returncode == 0, icl.stderr
  assert json.loads(icl.stdout)["examples"] == 4


@pytest.mark.parametrize("args,message", [
    (["generate"], "needs --prompt"),
    (["generate", "--prompt=x", "--top_p=0"], "top_p=0.0"),
    (["generate", "--prompt=x", "--max_new_tokens=0"], "max_new_tokens=0"),
    (["icl"], "needs --task"),
    (["icl", "--task=bbc_lm"], "text-to-text"),
    (["icl", "--task=bbc_topic", "--num=0"], "--num=0; it must be a positive integer"),
])
def test_verbs_refuse_bad_input(pretrained, args, message):
  run = _cli(*args, f"--model_dir={pretrained}")
  assert run.returncode == 2, run.stderr
  assert message in run.stderr and run.stderr.count("\n") == 1, run.stderr


def test_reading_a_missing_run_creates_nothing(tmp_path):
  missing = tmp_path / "no_such_run"
  run = _cli("generate", f"--gin_file=experiments/gpt_tiny_cpu.gin", f"--model_dir={missing}",
             "--prompt=x")
  assert run.returncode == 2 and "no such directory" in run.stderr, run.stderr
  with pytest.raises(UserError, match="no such directory"):
    _train(tmp_path / "clf", 2, f"train.init_from = '{missing}'")
  assert not missing.exists()
