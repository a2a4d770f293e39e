"""A finetuned classifier over a whole split: its predictions and its task's metrics (GLUE's
for GLUE tasks), every example counted once (the held-out loss during training reads full
batches only).

BERT and GPT classifiers have a head: the prediction is its argmax. A text-to-text model (T5)
writes its answer; it is scored by rank classification, as the T5 paper scores its GLUE runs
when it compares against heads: the class whose target words (+ EOS) it finds likeliest,

    ŷ = argmax_c  Σ_t log p(w_c,t | w_c,<t, inputs),

so every prediction is a valid class and no decoding length or postprocessing is involved."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import seqio
from flax import nnx

from pretrain_jax import config
from pretrain_jax.data import glue, pipeline
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


def class_scores(model, encoder_BS, targets_CT):
  """[B, C]: Σ_t log p(target_c,t | target_c,<t, inputs_b) for every example and class, by
  teacher forcing (row n = b·C + c of one decoder batch)."""
  num_classes = targets_CT.shape[0]
  targets_NT = jnp.tile(targets_CT, (encoder_BS.shape[0], 1))
  logits_NTV = model({"encoder_input_tokens": jnp.repeat(encoder_BS, num_classes, axis=0),
                      "decoder_input_tokens": jnp.pad(targets_NT[:, :-1], ((0, 0), (1, 0)))})
  log_p_NT = -optax.softmax_cross_entropy_with_integer_labels(logits_NTV.astype(jnp.float32),
                                                              targets_NT)
  return jnp.sum(log_p_NT * (targets_NT > 0), axis=-1).reshape(-1, num_classes)


def _rank_forward(model, targets_CT: np.ndarray):
  """A jitted `batch -> class ids` for an encoder-decoder (rank classification, above)."""
  if not getattr(getattr(model, "cfg", None), "is_encoder_decoder", False):
    raise UserError(f"text-to-text classification is scored for encoder-decoders; "
                    f"{type(model).__name__} is not one")
  graphdef, state = nnx.split(model)
  targets_CT = jnp.asarray(targets_CT)

  def predict(state, batch):
    scores_BC = class_scores(nnx.merge(graphdef, state), batch["encoder_input_tokens"],
                             targets_CT)
    return jnp.argmax(scores_BC, axis=-1)
  jitted = jax.jit(predict)
  return lambda batch: jitted(state, batch)


def class_targets(task: str, targets_length: int) -> np.ndarray:
  """[C, T] int32: each class word of a text-to-text task as the decoder writes it (its
  tokens, EOS, padding)."""
  feature = seqio.get_mixture_or_task(task).output_features["targets"]
  rows = [list(feature.vocabulary.encode(w)) + [feature.vocabulary.eos_id]
          for w in glue.CLASS_WORDS[task]]
  longest = max(len(r) for r in rows)
  if longest > targets_length:
    raise UserError(f"task {task!r}: its class words need {longest} target tokens, but "
                    f"feature_lengths.targets_length={targets_length}; set it to >= {longest}")
  return np.asarray([r + [0] * (targets_length - len(r)) for r in rows], np.int32)


def _labels_from_targets(targets_BT: np.ndarray, targets_CT: np.ndarray) -> np.ndarray:
  """Each row's class: which class's target row it equals."""
  match_BC = np.all(targets_BT[:, None, :] == targets_CT[None], axis=-1)
  if not np.all(match_BC.any(axis=-1)):
    raise UserError("an example's target is none of its task's class words "
                    f"{targets_BT[~match_BC.any(axis=-1)][0].tolist()}")
  return np.argmax(match_BC, axis=-1).astype(np.int32)


def predict_split(model, task: str, sequence_length: int, converter, split: str,
                  batch_size: int = 64) -> tuple[np.ndarray, np.ndarray]:
  """(labels, predictions) of every example of `split`; the last batch is padded by
  repeating its final row, and the repeats are dropped."""
  lengths = pipeline.feature_lengths(sequence_length)
  text_to_text = task in glue.CLASS_WORDS
  if text_to_text:  # one example per row, whatever the training run packed
    converter = seqio.EncDecFeatureConverter(pack=False)
  ds = pipeline._dataset(task, lengths, converter, split,  # pylint: disable=protected-access
                         seed=None, shuffle=False)
  rows = list(ds.as_numpy_iterator())
  if not rows:
    raise UserError(f"task {task!r} split {split!r} has no examples")
  if text_to_text:
    targets_CT = class_targets(task, lengths["targets"])
    forward = _rank_forward(model, targets_CT)
    labels_B = _labels_from_targets(np.stack([r["decoder_target_tokens"] for r in rows]),
                                    targets_CT)
    rows = [{"encoder_input_tokens": r["encoder_input_tokens"], "label": label}
            for r, label in zip(rows, labels_B)]
  else:
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
  """Whether the parsed gin config trains a classifier (so `eval` scores its task's metrics):
  a head's loss, or a text-to-text classification task."""
  loss = config.bound("train.loss_fn")
  return (getattr(loss, "__name__", None) in ("pooled_classifier_loss",
                                              "final_token_classifier_loss")
          or config.bound("train.task") in glue.CLASS_WORDS)


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
