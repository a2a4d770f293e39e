"""T5 (Raffel et al. 2020) and T5.1.1, plus the paper's architecture table in one module.

    x⁰ = E[tokens]                                   (one embedding for both stacks)
    encoder:  x ← x + Attn(RMSNorm(x), bidirectional bias)      x ← x + FF(RMSNorm(x))
    decoder:  y ← y + Attn(RMSNorm(y), causal bias)             y ← y + CrossAttn(RMSNorm(y), enc)
              y ← y + FF(RMSNorm(y))
    logits = RMSNorm(y) Eᵀ / √d  (T5, tied)    or    RMSNorm(y) W_out  (T5.1.1)
    FF = W_o ReLU(W_i x) (T5)    or    W_o (GELU(W_0 x) ⊙ W_1 x) (T5.1.1)

No biases anywhere; attention logits are not scaled by 1/√d_kv (the query initialisation
absorbs it); positions enter only as a learned scalar per (relative-distance bucket, head),
computed by each stack's first layer and shared by all its layers.

`architecture` picks a row of the T5 paper's Table 2 (all with the same blocks):
    encoder_decoder          L encoder + L decoder layers
    encoder_decoder_shared   the decoder reuses the encoder layers' self-attention and FF
    encoder_decoder_half     L/2 + L/2 layers
    decoder_only             an L-layer causal language model over inputs ++ targets
    prefix_lm                the same, attending bidirectionally within the inputs prefix
"""

from __future__ import annotations

import dataclasses
import functools
import math

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.errors import UserError
from pretrain_jax.layers.attention import (MultiHeadAttention, causal_mask, cross_mask,
                                           padding_mask, prefix_mask, segment_mask)
from pretrain_jax.layers.kv_cache import KVCache
from pretrain_jax.layers.linear import Dense, Embed, RMSNorm
from pretrain_jax.layers.mlp import GatedMlp, Mlp
from pretrain_jax.layers.sharding import constrain
from pretrain_jax.layers.stack import Stack, check_stack_options

ARCHITECTURES = ("encoder_decoder", "encoder_decoder_shared", "encoder_decoder_half",
                 "decoder_only", "prefix_lm")
MLPS = ("relu", "gated-gelu")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class T5Config:
  vocab_size: int = 32128
  d_model: int = 512
  num_heads: int = 8
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6  # per stack for encoder-decoders; the whole stack for decoder-only
  architecture: str = "encoder_decoder"
  mlp: str = "relu"  # T5: relu; T5.1.1: gated-gelu
  tie_embeddings: bool = True  # T5: tied, logits scaled by 1/√d_model; T5.1.1: untied
  relative_buckets: int = 32
  relative_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-6
  dtype: str = "float32"
  scan_layers: bool = True  # False: the same stacked parameters in a Python loop (debugging)
  scan_unroll: int | bool = 1  # layers per scan iteration; True: unrolled (faster on CPU)
  remat_policy: str = "none"  # or a jax.checkpoint_policies name, e.g. 'nothing_saveable'

  def __post_init__(self):
    check_stack_options("T5Config", self.remat_policy, self.scan_unroll)
    if self.architecture not in ARCHITECTURES:
      raise UserError(f"T5Config.architecture={self.architecture!r}; valid: {ARCHITECTURES}")
    if self.mlp not in MLPS:
      raise UserError(f"T5Config.mlp={self.mlp!r}; valid: {MLPS}")
    if self.architecture == "encoder_decoder_half" and self.num_layers % 2:
      raise UserError(f"T5Config.num_layers={self.num_layers} cannot be halved")

  @property
  def is_encoder_decoder(self) -> bool:
    return self.architecture.startswith("encoder_decoder")

  @property
  def stack_layers(self) -> int:
    return self.num_layers // 2 if self.architecture == "encoder_decoder_half" else self.num_layers


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
  """T5's buckets for key_position − query_position: exact for small distances, then
  logarithmic up to max_distance, beyond which all share the last bucket. A bidirectional
  stack spends half the buckets on each direction; a causal one sees only the past."""
  bucket = 0
  n = -relative_position
  if bidirectional:
    num_buckets //= 2
    bucket = (n < 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(n)
  else:
    n = jnp.maximum(n, 0)
  max_exact = num_buckets // 2
  large = max_exact + (jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact)
                       / math.log(max_distance / max_exact) * (num_buckets - max_exact))
  large = jnp.minimum(large.astype(jnp.int32), num_buckets - 1)
  return bucket + jnp.where(n < max_exact, n, large)


class RelativePositionBias(nnx.Module):
  """A learned scalar per (bucket, head), added to every layer's attention logits."""

  def __init__(self, cfg: T5Config, bidirectional: bool, *, rngs: nnx.Rngs):
    self.bidirectional, self.cfg = bidirectional, cfg
    self.embedding = Embed(cfg.relative_buckets, cfg.num_heads, ("relpos_buckets", "heads"),
                           init_std=1.0, dtype=cfg.dtype, rngs=rngs)

  def __call__(self, query_positions_BL, key_positions_BS):
    buckets_BLS = relative_position_bucket(
        key_positions_BS[:, None, :] - query_positions_BL[:, :, None],
        bidirectional=self.bidirectional, num_buckets=self.cfg.relative_buckets,
        max_distance=self.cfg.relative_max_distance)
    return jnp.transpose(self.embedding(buckets_BLS), (0, 3, 1, 2))  # [B, H, L, S]


def _attention(cfg: T5Config, rngs) -> MultiHeadAttention:
  d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
  return MultiHeadAttention(
      d, cfg.num_heads, head_dim=cfg.d_kv, dropout_rate=cfg.dropout_rate, use_bias=False,
      init_std=d ** -0.5, query_init_std=(d * cfg.d_kv) ** -0.5, out_init_std=inner ** -0.5,
      logit_scale=1.0, dtype=cfg.dtype, rngs=rngs)


def _feed_forward(cfg: T5Config, rngs):
  common = dict(use_bias=False, init_std=cfg.d_model ** -0.5, out_init_std=cfg.d_ff ** -0.5,
                dtype=cfg.dtype, rngs=rngs)
  if cfg.mlp == "gated-gelu":
    return GatedMlp(cfg.d_model, cfg.d_ff, functools.partial(jax.nn.gelu, approximate=True),
                    **common)
  return Mlp(cfg.d_model, cfg.d_ff, jax.nn.relu, **common)


SHARED_PARTS = ("attention_norm", "attention", "mlp_norm", "mlp")  # the "shared" row's


class T5Block(nnx.Module):
  """Self-attention (+ cross-attention in a decoder) + feed-forward, each pre-RMSNorm.

  Without `own_self_attention` the block builds only its cross-attention: the T5 paper's
  "shared" encoder-decoder hands it the encoder blocks' self-attention and feed-forward.
  """

  def __init__(self, cfg: T5Config, cross_attention: bool, *, rngs: nnx.Rngs,
               own_self_attention: bool = True):
    norm = lambda: RMSNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, rngs=rngs)
    if own_self_attention:
      self.attention_norm, self.attention = norm(), _attention(cfg, rngs)
      self.mlp_norm, self.mlp = norm(), _feed_forward(cfg, rngs)
    if cross_attention:
      self.cross_norm, self.cross_attention = norm(), _attention(cfg, rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, x_BLD, mask_B1LS, bias_BHLS, cache=None, *, index=None, context_BSD=None,
               context_mask_B1LS=None, rngs=None):
    """`cache` (decoding) = (keys, values, context keys, context values) of this layer.
    Returns (x, this layer's updated (keys, values) when decoding, else None)."""
    drop = lambda t: self.dropout(t, rngs=rngs, deterministic=rngs is None)
    self_cache = None if cache is None else (cache[0], cache[1], index)
    a_BLD, kv = self.attention(self.attention_norm(x_BLD), mask_B1LS, bias_BHLS=bias_BHLS,
                               cache=self_cache, rngs=rngs)
    x_BLD = x_BLD + drop(a_BLD)
    context_kv = None if cache is None else cache[2:]
    if context_BSD is not None or context_kv is not None:
      c_BLD, _ = self.cross_attention(self.cross_norm(x_BLD), context_mask_B1LS,
                                      context_BSD=context_BSD, context_kv=context_kv,
                                      rngs=rngs)
      x_BLD = x_BLD + drop(c_BLD)
    x_BLD = x_BLD + drop(self.mlp(self.mlp_norm(x_BLD)))
    return constrain(x_BLD, ("batch", "length", "act_embed")), None if cache is None else kv


class T5Stack(nnx.Module):
  """A scanned stack of blocks with its relative position bias and final RMSNorm."""

  def __init__(self, cfg: T5Config, *, decoder: bool, bidirectional: bool, rngs: nnx.Rngs,
               shared_with: "T5Stack | None" = None):
    self.cfg = cfg
    self.position_bias = RelativePositionBias(cfg, bidirectional, rngs=rngs)
    self.layers = Stack(lambda r: T5Block(cfg, cross_attention=decoder, rngs=r,
                                          own_self_attention=shared_with is None),
                        cfg.stack_layers, rngs=rngs, scan=cfg.scan_layers,
                        unroll=cfg.scan_unroll, remat_policy=cfg.remat_policy)
    if shared_with is not None:  # the same stacked Variables serve both stacks
      for name in SHARED_PARTS:
        setattr(self.layers.block, name, getattr(shared_with.layers.block, name))
    self.final_norm = RMSNorm(cfg.d_model, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                              rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, x_BLD, mask_B1LS, positions_BL, key_positions_BS=None, *,
               context_BSD=None, context_mask_B1LS=None, cache=None, index=None, rngs=None):
    """(final hidden states, the layers' updated (keys, values) when decoding)."""
    drop = lambda t: self.dropout(t, rngs=rngs, deterministic=rngs is None)
    bias_BHLS = self.position_bias(positions_BL, positions_BL if key_positions_BS is None
                                   else key_positions_BS)
    x_BLD, kvs = self.layers(drop(x_BLD), mask_B1LS, bias_BHLS, xs=cache, index=index,
                             context_BSD=context_BSD, context_mask_B1LS=context_mask_B1LS,
                             rngs=rngs)
    return drop(self.final_norm(x_BLD)), kvs


class T5(nnx.Module):
  """The shared embedding, the stack(s) and the output projection."""

  def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.token_embed = Embed(cfg.vocab_size, cfg.d_model, ("vocab", "embed"), init_std=1.0,
                             dtype=cfg.dtype, rngs=rngs)
    if cfg.is_encoder_decoder:
      self.encoder = T5Stack(cfg, decoder=False, bidirectional=True, rngs=rngs)
      shared = self.encoder if cfg.architecture == "encoder_decoder_shared" else None
      self.decoder = T5Stack(cfg, decoder=True, bidirectional=False, rngs=rngs,
                             shared_with=shared)
    else:  # a prefix LM's bucket table must cover both directions
      self.decoder = T5Stack(cfg, decoder=False, bidirectional=cfg.architecture == "prefix_lm",
                             rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = Dense(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), role="head",
                           use_bias=False, init_std=cfg.d_model ** -0.5, dtype=cfg.dtype,
                           rngs=rngs)

  def logits(self, y_BLD):
    if self.cfg.tie_embeddings:
      logits_BLV = self.token_embed.attend(y_BLD * self.cfg.d_model ** -0.5)
    else:
      logits_BLV = self.lm_head(y_BLD)
    return constrain(logits_BLV, ("batch", "length", "act_vocab"))

  def encode(self, tokens_BS, segment_ids_BS=None, positions_BS=None, rngs=None):
    segment_ids_BS = (tokens_BS > 0).astype(jnp.int32) if segment_ids_BS is None else segment_ids_BS
    positions_BS = _positions(tokens_BS) if positions_BS is None else positions_BS
    h_BSD, _ = self.encoder(self.token_embed(tokens_BS), segment_mask(segment_ids_BS, False),
                            positions_BS, rngs=rngs)
    return h_BSD

  def __call__(self, batch: dict, rngs=None):
    """Next-token logits for a batch of SeqIO features (encoder-decoder or decoder-only)."""
    tokens_BL = batch["decoder_input_tokens"]
    segments_BL = batch.get("decoder_segment_ids")
    if segments_BL is None:
      segments_BL = jnp.ones_like(tokens_BL)
    positions_BL = batch.get("decoder_positions", _positions(tokens_BL))
    mask_B1LL = causal_mask(segments_BL)
    context = {}
    if self.cfg.is_encoder_decoder:
      encoder_tokens_BS = batch["encoder_input_tokens"]
      encoder_segments_BS = batch.get("encoder_segment_ids",
                                      (encoder_tokens_BS > 0).astype(jnp.int32))
      context_BSD = self.encode(encoder_tokens_BS, encoder_segments_BS,
                                batch.get("encoder_positions"), rngs=rngs)
      if "decoder_segment_ids" in batch:  # packed: a decoder row reads only its own inputs
        context_mask_B1LS = cross_mask(segments_BL, encoder_segments_BS)
      else:
        context_mask_B1LS = padding_mask(encoder_segments_BS != 0)
      context = dict(context_BSD=context_BSD, context_mask_B1LS=context_mask_B1LS)
    elif self.cfg.architecture == "prefix_lm" and "decoder_causal_attention" in batch:
      mask_B1LL = prefix_mask(segments_BL, batch["decoder_causal_attention"] > 0)
    y_BLD, _ = self.decoder(self.token_embed(tokens_BL), mask_B1LL, positions_BL, rngs=rngs,
                            **context)
    return self.logits(y_BLD)

  # Incremental decoding (encoder-decoders) ---------------------------------------------------

  def decoding(self, encoder_tokens_BS) -> "T5Decoding":
    """The decoding protocol (models/protocol.py) for a batch of encoder inputs."""
    if not self.cfg.is_encoder_decoder:
      raise UserError(f"incremental decoding is built for encoder-decoders; architecture "
                      f"{self.cfg.architecture!r} is scored, not decoded")
    return T5Decoding(self, encoder_tokens_BS)

  def start_decoding(self, encoder_tokens_BS, slots: int) -> KVCache:
    """Runs the encoder once and projects its output into every decoder layer's keys/values."""
    context_BSD = self.encode(encoder_tokens_BS)
    graphdef, state = nnx.split(self.decoder.layers.block.cross_attention)
    project = lambda which: jax.vmap(
        lambda layer: getattr(nnx.merge(graphdef, layer), which)(context_BSD))(state)
    return KVCache.zeros(encoder_tokens_BS.shape[0], slots, [self.cfg.stack_layers],
                         self.cfg.num_heads, self.cfg.d_kv, dtype=self.cfg.dtype,
                         context_keys=(project("key"),), context_values=(project("value"),),
                         context_valid_BS=encoder_tokens_BS > 0)

  def decode(self, tokens_BL, positions_BL, valid_BL, cache: KVCache, last_only: bool = False):
    """Decoder steps over the cache: (logits [B, L, V], cache)."""
    mask_B1LS, valid_BS = cache.attend(valid_BL)
    key_positions_BS = jnp.broadcast_to(jnp.arange(valid_BS.shape[1]), valid_BS.shape)
    y_BLD, (keys, values) = self.decoder(
        self.token_embed(tokens_BL), mask_B1LS, positions_BL, key_positions_BS,
        context_mask_B1LS=padding_mask(cache.context_valid_BS), index=cache.index,
        cache=(cache.keys[0], cache.values[0], cache.context_keys[0], cache.context_values[0]))
    new_cache = cache.advance([keys], [values], valid_BS, tokens_BL.shape[1])
    return self.logits(y_BLD[:, -1:] if last_only else y_BLD), new_cache

  def train_flops_per_token(self, seq_len: int, targets_len: int | None = None) -> float:
    return flops_per_token(self.cfg, seq_len, targets_len)


class T5Decoding(nnx.Module):
  """An encoder-decoder bound to a batch of inputs, as inference/decoding.py's `Decoder`:
  `init_cache` encodes them, the decoder prompt is BOS (id 0)."""

  def __init__(self, model: T5, encoder_tokens_BS):
    self.model = model
    self.encoder_tokens = nnx.Variable(jnp.asarray(encoder_tokens_BS, jnp.int32))

  def init_cache(self, batch: int, slots: int) -> KVCache:
    del batch
    return self.model.start_decoding(self.encoder_tokens[...], slots)

  def decode(self, tokens_BL, positions_BL, valid_BL, cache, last_only: bool = False):
    return self.model.decode(tokens_BL, positions_BL, valid_BL, cache, last_only)


def _positions(tokens_BL):
  return jnp.broadcast_to(jnp.arange(tokens_BL.shape[1]), tokens_BL.shape)


@gin.configurable
def t5(seed: int, cfg: T5Config = gin.REQUIRED) -> T5:
  """The trainer's model factory."""
  return T5(cfg, rngs=nnx.Rngs(seed))


def param_count(cfg: T5Config) -> int:
  """t5-small 60,506,624; t5-base 222,903,552; t5-large 737,668,096 (the published counts)."""
  d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
  attention = 4 * d * inner
  ff = (3 if cfg.mlp == "gated-gelu" else 2) * d * cfg.d_ff
  block = attention + ff + 2 * d
  stacks = cfg.relative_buckets * cfg.num_heads + d  # bias table + final norm, per stack
  n = cfg.stack_layers
  if cfg.is_encoder_decoder:
    decoder_own = n * (attention + d) if cfg.architecture == "encoder_decoder_shared" else n * (
        block + attention + d)
    body = n * block + decoder_own + 2 * stacks
  else:
    body = n * block + stacks
  head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
  return cfg.vocab_size * d + body + head


def flops_per_token(cfg: T5Config, seq_len: int, targets_len: int | None = None) -> float:
  """Training FLOPs (6 × matmul MACs) per token read, inputs and targets both counted.

  An encoder-decoder runs the encoder over `seq_len` inputs and the decoder and head over
  `targets_len` targets only (None: as many as the inputs); each decoder layer also projects
  the encoder's keys and values and attends over them. One-stack architectures read one
  sequence of `seq_len`.
  """
  d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
  attention, ff = 4 * d * inner, (3 if cfg.mlp == "gated-gelu" else 2) * d * cfg.d_ff
  n = cfg.stack_layers
  if not cfg.is_encoder_decoder:
    return 6.0 * (n * (attention + ff + 2 * inner * seq_len) + d * cfg.vocab_size)
  targets_len = seq_len if targets_len is None else targets_len
  encoder = seq_len * n * (attention + ff + 2 * inner * seq_len)
  cross = targets_len * (2 * d * inner + 2 * inner * seq_len) + seq_len * 2 * d * inner
  decoder = n * (targets_len * (attention + ff + 2 * inner * targets_len) + cross)
  head = targets_len * d * cfg.vocab_size
  return 6.0 * (encoder + decoder + head) / (seq_len + targets_len)
