"""Finetuning losses for classifiers: BERT's on the pooled [CLS] (Devlin et al. 2018, §4.1),
and GPT-1's formats (Radford et al. 2018, §3.3): one token sequence per example, a linear
classifier on the hidden state of its final token.

    BERT:         softmax(W_c pooled) cross-entropy; C = 1: squared error (STS-B)

    single text:  [START] a [EXTRACT]
    pairs:        [START] a [DELIM] b [EXTRACT]
    loss:         L₂(C) + λ · L₁(C)     (classification + auxiliary LM on the same text, λ = 0.5)

[START], [DELIM] and [EXTRACT] are new tokens: the first three ids after the SentencePiece
pieces (the vocabulary's extra ids), so the pretrained embedding table already has rows
for them.
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from pretrain_jax.errors import UserError
from pretrain_jax.objectives.losses import cross_entropy

SPECIAL_TOKENS = ("start", "delim", "extract")


def special_ids(vocabulary) -> dict[str, int]:
  """{start, delim, extract} -> id: the first three extra ids above the base vocabulary."""
  extra = getattr(vocabulary, "extra_ids", 0)
  if extra < len(SPECIAL_TOKENS):
    raise UserError(f"the GPT finetuning format needs {len(SPECIAL_TOKENS)} extra ids in the "
                    f"vocabulary; it has {extra} (use a vocabulary built with extra_ids >= 3)")
  base = vocabulary.vocab_size - extra
  return {name: base + i for i, name in enumerate(SPECIAL_TOKENS)}


def truncate_pair(len_a, len_b, budget):
  """Lengths to keep of two texts that must fit `budget` tokens: the longer one is cut first."""
  keep_a = tf.minimum(len_a, tf.maximum(budget - len_b, (budget + 1) // 2))
  return keep_a, tf.minimum(len_b, budget - keep_a)


def gpt_format(dataset, sequence_length, output_features, fields=("inputs",)):
  """Tokenized `fields` (one or two) → "inputs" = [START] a ([DELIM] b) [EXTRACT], cut to fit."""
  if len(fields) not in (1, 2):
    raise UserError(f"gpt_format takes one or two text fields, got {fields}")
  ids = special_ids(output_features["inputs"].vocabulary)
  budget = sequence_length["inputs"] - 1 - len(fields)  # [START], [DELIM]?, [EXTRACT]
  if budget < len(fields):
    raise UserError(f"sequence length {sequence_length['inputs']} leaves no room for text in "
                    "the GPT finetuning format")
  start, delim, extract = (tf.constant([ids[k]], tf.int32) for k in SPECIAL_TOKENS)

  def fn(ex):
    a = tf.cast(ex[fields[0]], tf.int32)
    if len(fields) == 1:
      tokens = [start, a[:budget], extract]
    else:
      b = tf.cast(ex[fields[1]], tf.int32)
      keep_a, keep_b = truncate_pair(tf.size(a), tf.size(b), budget)
      tokens = [start, a[:keep_a], delim, b[:keep_b], extract]
    return {**ex, "inputs": tf.concat(tokens, axis=0)}

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


class ClassificationFeatureConverter(seqio.FeatureConverter):
  """Model features: `tokens` (the formatted inputs, 0-padded to the inputs length), `label`."""
  TASK_FEATURES = {"inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                   "label": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0)}
  MODEL_FEATURES = {"tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
                    "label": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0)}
  PACKING_FEATURE_DTYPES = None

  def __init__(self, **kwargs):
    super().__init__(pack=False, **kwargs)

  def __call__(self, ds, task_feature_lengths):
    return super().__call__(ds, {"inputs": task_feature_lengths["inputs"], "label": 1})

  def _convert_features(self, ds, task_feature_lengths):
    ds = ds.map(lambda ex: {"tokens": tf.cast(ex["inputs"], tf.int32),
                            "label": tf.cast(ex["label"], tf.int32)})
    return seqio.utils.trim_and_pad_dataset(ds, {"tokens": task_feature_lengths["inputs"]})

  def get_model_feature_lengths(self, task_feature_lengths):
    return {"tokens": task_feature_lengths["inputs"], "label": 1}


gin.external_configurable(ClassificationFeatureConverter)


@gin.configurable
def final_token_classifier_loss(model, batch, rngs=None, lm_weight: float = 0.5):
  """Cross-entropy of the classifier on the last real token (+ λ · the LM loss on the text)."""
  tokens_BL, labels_B = batch["tokens"], batch["label"]
  h_BLD, h_BD = _hidden_states(model, tokens_BL, rngs)
  ce_sum, correct, n, _ = cross_entropy(model.classify(h_BD), labels_B)
  loss = ce_sum / n
  metrics = {"classifier_loss": (ce_sum, n), "accuracy": (correct, n)}
  if lm_weight:
    lm_sum, _, lm_count, _ = cross_entropy(model.logits(h_BLD[:, :-1]), tokens_BL[:, 1:],
                                           tokens_BL[:, 1:] != 0)
    lm_count = jnp.maximum(lm_count, 1.0)
    loss = loss + lm_weight * lm_sum / lm_count
    metrics["lm_loss"] = (lm_sum, lm_count)
  metrics["loss"] = (loss * n, n)
  return loss, metrics


@gin.configurable
def pooled_classifier_loss(model, batch, rngs=None):
  """BERT finetuning: cross-entropy of the pooled-[CLS] classifier, or for a one-output head
  (a regression task such as STS-B) the mean squared error."""
  logits_BC = model(batch["input_ids"], batch["token_type_ids"], rngs=rngs)
  n = jnp.float32(logits_BC.shape[0])
  if logits_BC.shape[-1] == 1:
    error_B = logits_BC[:, 0].astype(jnp.float32) - batch["label"].astype(jnp.float32)
    sq = jnp.sum(error_B ** 2)
    return sq / n, {"loss": (sq, n), "mse": (sq, n)}
  ce_sum, correct, _, _ = cross_entropy(logits_BC, batch["label"])
  return ce_sum / n, {"loss": (ce_sum, n), "accuracy": (correct, n)}


def check_labels(labels_B: np.ndarray, num_classes: int) -> None:
  """Labels past a classifier's classes would be read by the loss as garbage: refuse them."""
  if num_classes < 2 or not np.issubdtype(labels_B.dtype, np.integer) or not labels_B.size:
    return
  bad = labels_B[(labels_B < 0) | (labels_B >= num_classes)]
  if bad.size:
    raise UserError(f"label {int(bad[0])} is outside the classifier's {num_classes} classes "
                    f"(0..{num_classes - 1}): set the head's num_classes to the task's number "
                    "of classes, or fix the task's labels")


def _hidden_states(model, tokens_BL, rngs=None):
  """All hidden states [B, L, D] and the final real token's [B, D] (rows are 0-padded)."""
  valid_BL = tokens_BL != 0
  h_BLD = model(tokens_BL, segment_ids_BL=valid_BL.astype(jnp.int32), rngs=rngs,
                return_hidden=True)
  last_B = jnp.maximum(valid_BL.sum(axis=1) - 1, 0)
  return h_BLD, jnp.take_along_axis(h_BLD, last_B[:, None, None], axis=1)[:, 0]


def predict(model, tokens_BL) -> jax.Array:
  """Class probabilities [B, C] for formatted, 0-padded rows."""
  _, h_BD = _hidden_states(model, tokens_BL)
  return jax.nn.softmax(model.classify(h_BD).astype(jnp.float32), axis=-1)
