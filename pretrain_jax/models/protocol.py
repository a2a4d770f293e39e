"""What the trainer, the losses, decoding and the CLI may call on a model.

Every family implements `Model`; each objective's loss reads the heads of one of the narrower
protocols below, and inference drives `Decoder` (or `EncoderDecoder.decoding`, which adapts an
encoder-decoder to it). They are `runtime_checkable` so the CLI can refuse a model with one
line instead of an AttributeError deep inside a jitted function.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax


@runtime_checkable
class Model(Protocol):
  """Any trainable network: a frozen config dataclass and its FLOPs accounting.

  Optional, not part of the protocol: `activated_params() -> int`, the parameters one token
  passes through, for models that activate fewer than they hold (mixtures of experts); the
  `info` verb (training/info.py) reports the total for models without it.
  """
  cfg: Any

  def train_flops_per_token(self, seq_len: int, targets_len: int | None = None) -> float:
    """Training FLOPs per token read at `seq_len` (6 × matmul MACs, attention included);
    `targets_len` is an encoder-decoder's second sequence (pipeline.decoder_length), which
    one-sequence models ignore."""


@runtime_checkable
class MaskedLm(Model, Protocol):
  """BERT-style encoders: hidden states, then the MLM head on gathered positions and NSP."""

  def encode(self, inputs_BL: jax.Array, segment_ids_BL: jax.Array, rngs=None) -> jax.Array: ...

  def mlm_logits(self, h_BPD: jax.Array) -> jax.Array: ...

  def nsp_logits(self, h_BLD: jax.Array) -> jax.Array: ...


@runtime_checkable
class CausalLm(Model, Protocol):
  """Decoders trained on packed next-token prediction."""

  def __call__(self, tokens_BL: jax.Array, *, positions_BL=None, segment_ids_BL=None,
               rngs=None, return_hidden: bool = False) -> jax.Array: ...

  def logits(self, h_BLD: jax.Array) -> jax.Array: ...


@runtime_checkable
class Classifier(CausalLm, Protocol):
  """A decoder with a classification head on one position's hidden state."""

  def classify(self, h_BD: jax.Array) -> jax.Array: ...


@runtime_checkable
class SequenceClassifier(Model, Protocol):
  """BERT's finetuning model: logits [B, C] of token ids and token types (C = 1: regression)."""
  num_classes: int

  def __call__(self, input_ids_BL: jax.Array, token_type_ids_BL: jax.Array,
               rngs=None) -> jax.Array: ...


@runtime_checkable
class TextToText(Model, Protocol):
  """Models that read a whole SeqIO feature batch (T5 and the rows of its architecture table)."""

  def __call__(self, batch: dict, rngs=None) -> jax.Array: ...


@runtime_checkable
class Decoder(Protocol):
  """Incremental decoding over a KV cache (inference/decoding.py, beam_search.py)."""

  def init_cache(self, batch: int, slots: int) -> Any: ...

  def decode(self, tokens_BL, positions_BL, valid_BL, cache, last_only: bool = False): ...


@runtime_checkable
class EncoderDecoder(Protocol):
  """A model that encodes inputs once, then decodes from BOS: `decoding` returns a `Decoder`
  bound to a batch of encoder inputs (UserError for rows that cannot be decoded)."""

  def decoding(self, encoder_tokens_BS) -> Decoder: ...
