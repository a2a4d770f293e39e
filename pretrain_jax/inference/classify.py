"""A finetuned classifier over a whole split: its predictions and its task's metrics (GLUE's
for GLUE tasks), every example counted once (the held-out loss during training reads full
batches only)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import seqio
from flax import nnx

from pretrain_jax import config
from pretrain_jax.data import pipeline
from pretrain_jax.errors import UserError
from pretrain_jax.inference import loading
from pretrain_jax.models import protocol
from pretrain_jax.objectives import classification


def _forward(model):
  """A jitted `batch -> predictions` for a SequenceClassifier (BERT) or a final-token
  Classifier (GPT): class ids, or the score of a one-output (regression) head."""
  graphdef, state = nnx.split(model)

  def predict(state, batch):
    module = nnx.merge(graphdef, state)
    if isinstance(module, protocol.Classifier):  # first: a GPT classifier also has num_classes
      logits_BC = jnp.log(classification.predict(module, batch["tokens"]))
    elif isinstance(module, protocol.SequenceClassifier):
      logits_BC = module(batch["input_ids"], batch["token_type_ids"]).astype(jnp.float32)
    else:
      raise UserError(f"{type(module).__name__} is not a classifier (BERT's bert_classifier "
                      "or GPT's gpt_classifier)")
    return logits_BC[:, 0] if logits_BC.shape[-1] == 1 else jnp.argmax(logits_BC, axis=-1)
  jitted = jax.jit(predict)  # once: every batch has the same shapes
  return lambda batch: jitted(state, batch)


def predict_split(model, task: str, sequence_length: int, converter, split: str,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """(labels, predictions) of every example of `split`; the last batch is padded by
  repeating its final row, and the repeats are dropped."""
  ds = pipeline._dataset(task, pipeline.feature_lengths(sequence_length), converter, split,  # pylint: disable=protected-access
                         seed=None, shuffle=False)
  rows = list(ds.as_numpy_iterator())
  if not rows:
    raise UserError(f"task {task!r} split {split!r} has no examples")
  forward = _forward(model)
  labels, predictions = [], []
  for start in range(0, len(rows), batch_size):
    chunk = rows[start:start + batch_size]
    real = len(chunk)
    chunk = chunk + [chunk[-1]] * (batch_size - real)
    batch = {k: jnp.asarray(np.stack([r[k] for r in chunk])) for k in chunk[0]}
    predictions.append(np.asarray(forward({k: v for k, v in batch.items() if k != "label"}))[:real])
    labels.append(np.asarray(batch["label"])[:real])
  return np.concatenate(labels), np.concatenate(predictions)


def is_classifier_run() -> bool:
  """Whether the parsed gin config trains a classifier (so `eval` scores its task's metrics)."""
  loss = config.bound("train.loss_fn")
  return getattr(loss, "__name__", None) in ("pooled_classifier_loss",
                                             "final_token_classifier_loss")


def evaluate(model_dir: str, split: str = "test", batch_size: int = 64,
             per_example: bool = False) -> dict:
  """The task's metric functions over every example of `split` for the run in `model_dir`
  (its config.gin already parsed), with accuracy's standard error √(p(1−p)/n); `per_example`
  adds the `labels` and `predictions` lists (in the split's order, for paired comparisons)."""
  model, _, step = loading.load(model_dir)
  task = config.bound("train.task")
  lengths = config.bound("train.sequence_length")
  labels, predictions = predict_split(model, task, lengths, config.bound("train.feature_converter"),
                                      split, batch_size)
  result = {"step": step, "split": split, "examples": int(labels.size)}
  for fn in seqio.get_mixture_or_task(task).metric_fns:
    result.update(fn(labels, predictions))
  if np.issubdtype(predictions.dtype, np.integer):
    p = float(np.mean(labels == predictions))
    result["accuracy"] = p
    result["accuracy_stderr"] = math.sqrt(p * (1 - p) / labels.size)
  if per_example:
    result.update(labels=labels.tolist(), predictions=predictions.tolist())
  return result


def mcnemar_p(correct_a, correct_b) -> float:
  """Exact two-sided McNemar p-value: do two classifiers scored on the same examples differ?

  Only the examples one gets right and the other wrong count; under "no difference" each such
  example is a fair coin, so the p-value is a binomial tail over them. Paired, so it sees a
  difference that two accuracies' separate standard errors blur.
  """
  a, b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
  if a.shape != b.shape:
    raise UserError(f"paired scores of different lengths: {a.size} and {b.size} examples")
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
  n = only_a + only_b
  tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
  return min(1.0, 2 * tail)
