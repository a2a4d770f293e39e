"""The T5 paper's architecture × objective table (Raffel et al. 2020, Table 2) at tiny scale.

Every cell pretrains t5_tiny's blocks in one architecture with one objective on the bundled
BBC corpus — same steps, batch and lengths for all, so equal compute up to the architectures'
own differences (as in the paper: encoder-decoder 2P parameters / M FLOPs, shared P / M,
half P / M/2, the decoder-only LMs P / M) — then finetunes it text-to-text on the BBC topic
task and scores the 5 topic words by likelihood on held-out articles.

  .venv/bin/python scripts/objective_study.py --out_dir runs/objective_study \
      --markdown docs/objective_study.md

Objectives: "denoising" is the paper's baseline (i.i.d. 15 % noise, each run of noise one
sentinel: bbc_iid_noise); "LM" splits a text at a random point (bbc_prefix_lm), and the plain
decoder-only LM predicts the whole text.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import json
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf
from absl import logging as absl_logging

from pretrain_jax import registry  # noqa: F401  (gin configurables and tasks)
from pretrain_jax.config import bound, configure
from pretrain_jax.data import corpora, pipeline, vocabularies
from pretrain_jax.inference import loading
from pretrain_jax.training import metrics as metrics_lib, trainer

absl_logging.set_verbosity(absl_logging.ERROR)

ARCHITECTURES = ("encoder_decoder", "encoder_decoder_shared", "encoder_decoder_half",
                 "prefix_lm", "decoder_only")
OBJECTIVES = {"denoising": "bbc_iid_noise", "LM": "bbc_prefix_lm"}
# GLUE averages of the paper's Table 2 (the ordering is what a tiny study can compare).
PAPER_GLUE = {("encoder_decoder", "denoising"): 83.28, ("encoder_decoder_shared", "denoising"): 82.81,
              ("encoder_decoder_half", "denoising"): 80.88, ("prefix_lm", "denoising"): 81.82,
              ("decoder_only", "denoising"): 74.70, ("encoder_decoder", "LM"): 79.56,
              ("encoder_decoder_shared", "LM"): 79.60, ("encoder_decoder_half", "LM"): 78.67,
              ("prefix_lm", "LM"): 79.68, ("decoder_only", "LM"): 73.78}


def _bindings(architecture: str, task: str, inputs: int, targets: int, loss_on_all: bool):
  """The architecture's overlay (gin_configs/t5_table/) plus lengths: encoder-decoders read
  inputs and write targets; decoder-only models read inputs ++ targets as one sequence."""
  encoder_decoder = architecture.startswith("encoder_decoder")
  bindings = [f"include 't5_table/{architecture}.gin'", f"train.task = '{task}'",
              f"feature_lengths.targets_length = {targets}",
              f"train.sequence_length = {inputs if encoder_decoder else inputs + targets}"]
  if loss_on_all:
    bindings.append("CausalLmFeatureConverter.loss_on_targets_only = False")
  return bindings


def _run(model_dir: str, bindings: list[str]) -> list[dict]:
  gin.clear_config()
  configure(["experiments/t5_tiny_span_corruption_cpu.gin"], bindings)
  trainer.train(model_dir, progress=False)
  return metrics_lib.read(model_dir)


def _topic_examples(splits=("validation", "test")) -> list[tuple[str, int]]:
  return [(a["text"], a["label"]) for s in splits for a in corpora.bbc_articles(s)]


def topic_accuracy(model_dir: str, inputs_length: int, batch_size: int = 40) -> float:
  """Scores each of the 5 topic words as the target of every held-out article (summed
  log-likelihood through the run's own feature converter); accuracy of the best."""
  model, vocab, _ = loading.load(model_dir)
  converter = bound("train.feature_converter")
  lengths = pipeline.feature_lengths(bound("train.sequence_length"))
  topics = list(corpora.BBC_TOPICS)
  examples = _topic_examples()
  rows = []
  for text, _ in examples:
    ids = vocab.encode(" ".join(text.split()))[:inputs_length - 1] + [vocab.eos_id]
    rows += [{"inputs": ids, "targets": vocab.encode(t) + [vocab.eos_id]} for t in topics]
  ds = tf.data.Dataset.from_generator(
      lambda: iter(rows), output_signature={k: tf.TensorSpec([None], tf.int32)
                                            for k in ("inputs", "targets")})
  converter = type(converter)(pack=False) if hasattr(converter, "pack") else converter
  ds = converter(ds, lengths).batch(batch_size)

  @jax.jit
  def target_log_likelihood(batch):
    logits = model(batch).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, -1)
    picked = jnp.take_along_axis(log_probs, batch["decoder_target_tokens"][..., None], -1)[..., 0]
    return (picked * batch["decoder_loss_weights"]).sum(-1)

  scores = np.concatenate([np.asarray(target_log_likelihood(b)) for b in ds.as_numpy_iterator()])
  predicted = scores.reshape(len(examples), len(topics)).argmax(1)
  return float(np.mean(predicted == np.array([label for _, label in examples])))


def study(out_dir: str, pretrain_steps: int, finetune_steps: int, batch_size: int,
          length: int) -> list[dict]:
  results = []
  for objective, task in OBJECTIVES.items():
    for architecture in ARCHITECTURES:
      cell = f"{architecture}-{objective}"
      start = time.perf_counter()
      pretrain_dir = os.path.join(out_dir, cell, "pretrain")
      loss_on_all = architecture == "decoder_only" and objective == "LM"
      train = [f"train.batch_size = {batch_size}", f"train.num_steps = {pretrain_steps}",
               "train.log_every = 50", f"train.eval_every = {pretrain_steps}",
               "train.eval_batches = 8", f"train.checkpoint_every = {pretrain_steps}"]
      records = _run(pretrain_dir, _bindings(architecture, task, length, length, loss_on_all)
                     + train)
      held_out = [r for r in records if r["split"] == "validation"][-1]["loss"]
      finetune_dir = os.path.join(out_dir, cell, "finetune")
      _run(finetune_dir, _bindings(architecture, "bbc_topic", length, 4, False) + [
          f"train.batch_size = {batch_size}", f"train.num_steps = {finetune_steps}",
          "train.log_every = 50", "train.eval_every = 0",
          f"train.checkpoint_every = {finetune_steps}", f"train.init_from = '{pretrain_dir}'",
          "rsqrt_decay.learning_rate = 0.003"])
      accuracy = topic_accuracy(finetune_dir, length)
      results.append({"architecture": architecture, "objective": objective,
                      "held_out_loss": held_out, "topic_accuracy": accuracy,
                      "seconds": time.perf_counter() - start})
      print(json.dumps(results[-1]), flush=True)
  return results


def markdown(results: list[dict], command: str, seconds: float) -> str:
  by = {(r["architecture"], r["objective"]): r for r in results}
  lines = ["| architecture | " + " | ".join(f"{o}: topic accuracy | {o}: held-out loss"
                                           for o in OBJECTIVES) + " | paper GLUE (denoising / LM) |",
           "|---" * (1 + 2 * len(OBJECTIVES) + 1) + "|"]
  for a in ARCHITECTURES:
    cells = " | ".join(f"{by[a, o]['topic_accuracy']:.1%} | {by[a, o]['held_out_loss']:.3f}"
                       for o in OBJECTIVES)
    lines.append(f"| {a} | {cells} | {PAPER_GLUE[a, 'denoising']} / {PAPER_GLUE[a, 'LM']} |")
  return (f"Command: `{command}` ({seconds / 60:.1f} min)\n\n" + "\n".join(lines) + "\n")


def plot(results: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
  x = np.arange(len(ARCHITECTURES))
  for i, objective in enumerate(OBJECTIVES):
    rows = [next(r for r in results if r["architecture"] == a and r["objective"] == objective)
            for a in ARCHITECTURES]
    axes[0].bar(x + 0.4 * i - 0.2, [r["topic_accuracy"] for r in rows], 0.4, label=objective)
    axes[1].bar(x + 0.4 * i - 0.2, [r["held_out_loss"] for r in rows], 0.4, label=objective)
  for ax, title in zip(axes, ("BBC topic accuracy after finetuning", "held-out pretraining loss")):
    ax.set_xticks(x, [a.replace("encoder_decoder", "enc-dec") for a in ARCHITECTURES],
                  rotation=20)
    ax.set_title(title)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=90)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out_dir", default="runs/objective_study")
  parser.add_argument("--pretrain_steps", type=int, default=400)
  parser.add_argument("--finetune_steps", type=int, default=150)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--length", type=int, default=64)
  parser.add_argument("--markdown", default=None, help="write the table here")
  args = parser.parse_args()
  start = time.perf_counter()
  results = study(os.path.abspath(args.out_dir), args.pretrain_steps, args.finetune_steps,
                  args.batch_size, args.length)
  with open(os.path.join(args.out_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  plot(results, os.path.join(args.out_dir, "objective_study.png"))
  table = markdown(results, "python scripts/objective_study.py " + " ".join(sys.argv[1:]),
                   time.perf_counter() - start)
  print(table)
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table)


if __name__ == "__main__":
  main()
