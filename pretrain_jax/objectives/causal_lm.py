"""Causal language modelling (GPT): next-token prediction over packed documents.

Pipeline of an LM task (SeqIO preprocessors, then the feature converter):

    {"text"} ─ rekey, tokenize, append EOS ─► {"targets": a whole document + EOS}
             ─ split_to_length ─► chunks of at most L tokens (EOS only at a real document end)
             ─ CausalLmFeatureConverter (SeqIO's, packing on) ─►
               decoder_input_tokens   0 x₁ x₂ … (shifted right, 0 opens each document)
               decoder_target_tokens  x₁ x₂ x₃ …
               decoder_loss_weights   1 on real tokens, 0 on padding
               decoder_segment_ids    1 1 1 2 2 … 0 (which packed document; 0 = padding)
               decoder_positions      0 1 2 0 1 … (restarting in each document)

A task with "inputs" and "targets" (text-to-text finetuning) becomes one sequence
inputs ++ targets with the loss on the targets only.
"""

from __future__ import annotations

import gin
import jax.numpy as jnp
import seqio
import tensorflow as tf

from pretrain_jax.objectives.losses import cross_entropy


def split_to_length(dataset, sequence_length, output_features, length_of=None):
  """Cuts each tokenized document into consecutive chunks of at most L tokens, so long
  documents are all read (the converter would otherwise truncate them to their first L).

  L is the targets length, or `length_of(sequence_length)` (T5's objectives read raw chunks
  sized so that their corrupted inputs fit).
  """
  del output_features
  length = length_of(sequence_length) if length_of else sequence_length["targets"]

  def chunks(ex):
    tokens = ex["targets"]
    starts = tf.range(0, tf.size(tokens), length)
    splits = tf.concat([starts, [tf.size(tokens)]], axis=0)
    return tf.data.Dataset.from_tensor_slices(
        {"targets": tf.RaggedTensor.from_row_splits(tokens, splits)})

  return dataset.flat_map(chunks)


@gin.configurable
class CausalLmFeatureConverter(seqio.DecoderFeatureConverter):
  """SeqIO's decoder converter (packing on by default) for our trainer's length convention.

  The trainer asks for {"inputs": Lᵢ, "targets": Lₜ} (see pipeline.feature_lengths). An LM
  task has no inputs: its rows are Lₜ long. A text-to-text task becomes one row of Lᵢ + Lₜ.
  """

  def __call__(self, ds, task_feature_lengths):
    if "inputs" not in ds.element_spec:
      task_feature_lengths = {"targets": task_feature_lengths["targets"]}
    return super().__call__(ds, task_feature_lengths)


@gin.configurable
def causal_lm_loss(model, batch, rngs=None, z_loss: float = 0.0):
  """Next-token cross-entropy of a decoder (`Gpt`) over the packed batch."""
  logits_BLV = model(batch["decoder_input_tokens"], positions_BL=batch.get("decoder_positions"),
                     segment_ids_BL=batch.get("decoder_segment_ids"), rngs=rngs)
  return token_cross_entropy(logits_BLV, batch, z_loss)


@gin.configurable
def text_to_text_loss(model, batch, rngs=None, z_loss: float = 0.0):
  """The same loss for models that read the whole feature batch (T5 and its table's variants:
  encoder inputs, or a decoder-only prefix)."""
  return token_cross_entropy(model(batch, rngs=rngs), batch, z_loss)


def token_cross_entropy(logits_BLV, batch, z_loss: float = 0.0):
  """Token-mean cross-entropy over `decoder_loss_weights` (+ z_loss · mean log Z²).

  Metrics are (numerator, denominator) sums, so `loss` is the exact mean over tokens and
  `perplexity` = exp(loss) (see metrics.reduce).
  """
  ce_sum, correct, count, z_sum = cross_entropy(logits_BLV, batch["decoder_target_tokens"],
                                                batch["decoder_loss_weights"])
  loss = ce_sum / jnp.maximum(count, 1.0)
  metrics = {"loss": (ce_sum, count), "log_perplexity": (ce_sum, count),
             "accuracy": (correct, count)}
  if z_loss:
    loss = loss + z_loss * z_sum / jnp.maximum(count, 1.0)
    metrics["z_loss"] = (z_sum, count)
  return loss, metrics
