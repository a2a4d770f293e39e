"""Masked language modelling (BERT, RoBERTa, SpanBERT) as SeqIO preprocessors plus its loss.

Pipeline of a masked-LM task (each step a SeqIO preprocessor):

    {"text"} ─ tokenize_sentences ─► {"sentences": ragged ids}
             ─ next_sentence_pairs (BERT) | full_sentences (RoBERTa, SpanBERT)
             ─► {"targets": [CLS] A [SEP] B [SEP], "segment_ids", "nsp_label"?}
             ─ mask_tokens ─► {"inputs": masked ids, "targets", "loss_weights", ...}

Masking happens after SeqIO's per-epoch seed is drawn, so a new epoch (the trainer passes
seed + epoch) gets fresh masks: RoBERTa's dynamic masking. Every selected position carries
loss, including the 10 % random and 10 % unchanged ones (SeqIO's EncoderFeatureConverter
would weight only [MASK] positions, which is not BERT).
"""

from __future__ import annotations

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
import numpy as np
import seqio
import tensorflow as tf

from pretrain_jax.errors import UserError
from pretrain_jax.objectives.losses import cross_entropy
from pretrain_jax.objectives import masking, sentence_pairs


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MaskingConfig:
  """Shared by the masking preprocessor and the loss (which gathers `predictions` positions)."""
  mask_rate: float = 0.15
  max_predictions: int | None = None  # None: ceil(sequence_length × mask_rate), as BERT's 20/128
  mask_prob: float = 0.8
  random_prob: float = 0.1
  span_p: float = 0.2
  max_span_length: int = 10

  def __post_init__(self):
    if not 0 < self.mask_rate < 1:
      raise UserError(f"MaskingConfig.mask_rate={self.mask_rate}; it must lie in (0, 1)")
    if not (0 <= self.mask_prob and 0 <= self.random_prob and
            self.mask_prob + self.random_prob <= 1):
      raise UserError(f"MaskingConfig.mask_prob={self.mask_prob} and random_prob="
                      f"{self.random_prob} must be >= 0 and sum to at most 1")
    if not 0 < self.span_p <= 1 or self.max_span_length < 1:
      raise UserError(f"MaskingConfig.span_p={self.span_p} must lie in (0, 1] and "
                      f"max_span_length={self.max_span_length} be >= 1")

  def predictions(self, sequence_length: int) -> int:
    return self.max_predictions or math.ceil(sequence_length * self.mask_rate)


def _vocab(output_features):
  return output_features["targets"].vocabulary


# Sentence splitting: a boundary after . ! ? (optionally a closing quote) before a capital,
# and at every line break. RE2 has no look-behind, so mark boundaries, then split.
_BOUNDARY = r"([.!?][\"'”’)]?)\s+([\"“‘(]?[A-Z0-9])"


def tokenize_sentences(dataset, output_features):
  """{"text"} → {"sentences": int32 ragged [num_sentences, None]} (empty sentences dropped)."""
  vocab = _vocab(output_features)

  def fn(ex):
    text = tf.strings.regex_replace(ex["text"], _BOUNDARY, "\\1\n\\2")
    sentences = tf.strings.split(text, "\n")
    sentences = tf.boolean_mask(sentences, tf.strings.length(tf.strings.strip(sentences)) > 0)
    ids = vocab.encode_tf(sentences)
    ids = tf.ragged.boolean_mask(ids, ids.row_lengths() > 0)
    return {"sentences": tf.cast(ids, tf.int32)}

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


@seqio.map_over_dataset(num_seeds=1)
def _attach_seed(ex, seed):
  return {**ex, "seed": seed}


def _next_seed() -> int | None:
  """The next integer from SeqIO's map-seed manager (what map_over_dataset draws from)."""
  next_seed = seqio.utils._NEXT_MAP_SEED  # pylint: disable=protected-access
  if next_seed is None:
    return None
  seqio.utils._NEXT_MAP_SEED += 2  # pylint: disable=protected-access
  return int(next_seed)


def _rng(seed: np.ndarray) -> np.random.Generator:
  return np.random.default_rng(np.asarray(seed, np.int64).astype(np.uint32))


@gin.configurable
def next_sentence_pairs(dataset, sequence_length, output_features, short_seq_prob=0.1,
                        shuffle_buffer=1024):
  """BERT's sentence pairs: 50 % the true next segment, 50 % a segment of another document."""
  vocab = _vocab(output_features)
  max_length = _checked_length(sequence_length, minimum=5)  # [CLS] a [SEP] b [SEP]
  dataset = _attach_seed(dataset)
  others = dataset.map(lambda ex: ex["sentences"]).shuffle(shuffle_buffer, seed=_next_seed())
  others = others.repeat()

  def make(flat, splits, other_flat, other_splits, seed):
    doc, rnd = _split_ragged(flat, splits), _split_ragged(other_flat, other_splits)
    pairs = sentence_pairs.next_sentence_instances(
        doc, rnd, _rng(seed), max_length=max_length, cls_id=vocab.cls_id, sep_id=vocab.sep_id,
        short_seq_prob=short_seq_prob)
    tokens = np.zeros((len(pairs), max_length), np.int32)
    segments = np.zeros((len(pairs), max_length), np.int32)
    labels = np.zeros((len(pairs),), np.int32)
    lengths = np.zeros((len(pairs),), np.int32)
    for i, (t, s, label) in enumerate(pairs):
      tokens[i, :len(t)], segments[i, :len(s)], labels[i], lengths[i] = t, s, label, len(t)
    return tokens, segments, labels, lengths

  def to_pairs(ex, other):
    doc = ex["sentences"]
    tokens, segments, labels, lengths = tf.numpy_function(
        make, [doc.flat_values, doc.row_splits, other.flat_values, other.row_splits,
               tf.stack(ex["seed"])],
        [tf.int32, tf.int32, tf.int32, tf.int32], stateful=False)
    for t in (tokens, segments):
      t.set_shape([None, max_length])
    labels.set_shape([None])
    lengths.set_shape([None])
    return tf.data.Dataset.from_tensor_slices({
        "targets": tf.RaggedTensor.from_tensor(tokens, lengths=lengths),
        "segment_ids": tf.RaggedTensor.from_tensor(segments, lengths=lengths),
        "nsp_label": labels,
    })

  return tf.data.Dataset.zip((dataset, others)).flat_map(to_pairs)


def _checked_length(sequence_length, minimum: int) -> int:
  length = sequence_length["targets"]
  if length < minimum:
    raise UserError(f"sequence length {length} is too short for this objective "
                    f"(at least {minimum})")
  return length


def _split_ragged(flat_values, row_splits) -> list[np.ndarray]:
  return np.split(np.asarray(flat_values, np.int32), np.asarray(row_splits)[1:-1])


@gin.configurable
def full_sentences(dataset, sequence_length, output_features):
  """RoBERTa's FULL-SENTENCES: contiguous sentences packed up to the length, across documents."""
  vocab = _vocab(output_features)
  max_length = _checked_length(sequence_length, minimum=3)  # [CLS] x [SEP]

  def generate():
    ragged = dataset.map(lambda ex: (ex["sentences"].flat_values, ex["sentences"].row_splits))
    docs = (_split_ragged(flat, splits) for flat, splits in ragged.as_numpy_iterator())
    for tokens, segments in sentence_pairs.full_sentence_instances(
        docs, max_length=max_length, cls_id=vocab.cls_id, sep_id=vocab.sep_id):
      yield {"targets": tokens, "segment_ids": segments}

  spec = tf.TensorSpec([None], tf.int32)
  return tf.data.Dataset.from_generator(
      generate, output_signature={"targets": spec, "segment_ids": spec})


@gin.configurable
def mask_tokens(dataset, sequence_length, output_features, unit: str = "token",
                masking_config: MaskingConfig | None = None):
  """Selects 15 % of the non-special tokens (by token, whole word or span) and corrupts them."""
  cfg = masking_config or MaskingConfig()
  vocab = _vocab(output_features)
  max_predictions = cfg.predictions(sequence_length["targets"])
  special = np.asarray(vocab.special_ids, np.int32)
  random_ids = np.setdiff1d(np.arange(vocab.vocab_size, dtype=np.int32), special)
  word_start = np.asarray(vocab.word_start) if unit != "token" else None

  def mask(targets, seed):
    inputs, weights = masking.mask_tokens(
        targets, _rng(seed), special_ids=special, vocab_size=vocab.vocab_size,
        mask_id=vocab.mask_id, mask_rate=cfg.mask_rate, max_predictions=max_predictions,
        unit=unit, word_start=word_start, span_p=cfg.span_p,
        max_span_length=cfg.max_span_length, mask_prob=cfg.mask_prob,
        random_prob=cfg.random_prob, random_ids=random_ids)
    return inputs.astype(np.int32), weights.astype(np.float32)

  @seqio.map_over_dataset(num_seeds=1)
  def fn(ex, seed):
    inputs, weights = tf.numpy_function(mask, [ex["targets"], tf.stack(seed)],
                                        [tf.int32, tf.float32],
                                        stateful=False)
    inputs.set_shape(ex["targets"].shape)
    weights.set_shape(ex["targets"].shape)
    return {**ex, "inputs": inputs, "loss_weights": weights}

  return fn(dataset)


class MaskedLmFeatureConverter(seqio.FeatureConverter):
  """Pads task features to the sequence length; the model sees the names the task made.

  Model features: `inputs` (masked ids), `targets` (original ids), `loss_weights`
  (1 where the loss counts), `segment_ids` (0 for A, 1 for B), and `nsp_label` when the task
  makes sentence pairs. Padding is id 0.
  """
  _SEQUENCE = {"inputs": tf.int32, "targets": tf.int32, "segment_ids": tf.int32,
               "loss_weights": tf.float32}
  TASK_FEATURES = {k: seqio.FeatureConverter.FeatureSpec(dtype=v) for k, v in _SEQUENCE.items()}
  MODEL_FEATURES = TASK_FEATURES
  PACKING_FEATURE_DTYPES = None

  def __init__(self, **kwargs):
    super().__init__(pack=False, **kwargs)

  def __call__(self, ds, task_feature_lengths):
    features = dict(type(self).TASK_FEATURES)
    if "nsp_label" in ds.element_spec:
      features["nsp_label"] = seqio.FeatureConverter.FeatureSpec(dtype=tf.int32, rank=0)
    self.TASK_FEATURES = self.MODEL_FEATURES = features
    length = task_feature_lengths["inputs"]  # every per-token feature has the input length
    return super().__call__(ds, {k: length for k in features})

  def _convert_features(self, ds, task_feature_lengths):
    ds = ds.map(lambda ex: {k: ex[k] for k in self.MODEL_FEATURES})
    lengths = {k: v for k, v in task_feature_lengths.items() if k in self._SEQUENCE}
    return seqio.utils.trim_and_pad_dataset(ds, lengths)

  def get_model_feature_lengths(self, task_feature_lengths):
    return dict(task_feature_lengths)  # rank-0 nsp_label's "length" is ignored by the checks


gin.external_configurable(MaskedLmFeatureConverter)


# Loss ------------------------------------------------------------------------------------------

@gin.configurable
def masked_lm_loss(model, batch, rngs=None, masking_config: MaskingConfig | None = None):
  """MLM cross-entropy over the selected positions (+ NSP when the batch has labels).

  Only the `predictions` highest-weighted positions are projected onto the vocabulary: the
  masking cap guarantees every selected position is among them.
  Returns (loss, metrics) with metrics as (numerator, denominator) pairs.
  """
  cfg = masking_config or MaskingConfig()
  inputs_BL, weights_BL = batch["inputs"], batch["loss_weights"]
  h_BLD = model.encode(inputs_BL, batch["segment_ids"], rngs=rngs)
  num_predictions = min(cfg.predictions(inputs_BL.shape[1]), inputs_BL.shape[1])
  weights_BP, positions_BP = jax.lax.top_k(weights_BL, num_predictions)
  h_BPD = jnp.take_along_axis(h_BLD, positions_BP[..., None], axis=1)
  targets_BP = jnp.take_along_axis(batch["targets"], positions_BP, axis=1)
  mlm_sum, mlm_correct, mlm_count, _ = cross_entropy(model.mlm_logits(h_BPD), targets_BP,
                                                     weights_BP)
  loss = mlm_sum / jnp.maximum(mlm_count, 1.0)
  metrics = {"mlm_loss": (mlm_sum, mlm_count), "mlm_accuracy": (mlm_correct, mlm_count)}
  if "nsp_label" in batch:
    nsp_sum, nsp_correct, nsp_count, _ = cross_entropy(model.nsp_logits(h_BLD),
                                                       batch["nsp_label"])
    loss = loss + nsp_sum / nsp_count
    metrics.update(nsp_loss=(nsp_sum, nsp_count), nsp_accuracy=(nsp_correct, nsp_count))
  metrics["loss"] = (loss, jnp.float32(1.0))
  return loss, metrics
