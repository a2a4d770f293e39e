"""Decoder-only Transformers: GPT-1, GPT-2 and a modern (Llama-style) decoder in one module.

    h⁰ = E_tok[x] (+ E_pos[i] with learned positions)
    GPT-1, post-LN:   a = LN(h + Attn(h));     h' = LN(a + MLP(a))
    GPT-2, pre-LN:    a = h + Attn(LN(h));     h' = a + MLP(LN(a));    final LN
    modern:           pre-RMSNorm, RoPE on q and k, SwiGLU MLP, grouped-query attention, no biases
    p(x_{i+1} | x_≤i) = softmax(h_i W_outᵀ),   W_out = E_tok when tied

Attention is causal and never crosses a packed document boundary. `decode` runs the same
network over a key/value cache (prefill, then one token at a time); inference/decoding.py
drives it.
"""

from __future__ import annotations

import dataclasses
import math

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.errors import UserError
from pretrain_jax.layers.attention import MultiHeadAttention, SegmentMask
from pretrain_jax.layers.kv_cache import KVCache
from pretrain_jax.layers.linear import Dense, Embed, LayerNorm, RMSNorm
from pretrain_jax.layers.mlp import GatedMlp, Mlp
from pretrain_jax.layers.sharding import constrain
from pretrain_jax.layers.stack import Stack, check_stack_options

NORMS = ("post_layernorm", "pre_layernorm", "pre_rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class GptConfig:
  vocab_size: int = 50257
  hidden: int = 768
  num_layers: int = 12
  num_heads: int = 12
  num_kv_heads: int | None = None  # None: as many as query heads; fewer: grouped-query attention
  head_dim: int | None = None  # None: hidden // num_heads
  mlp_dim: int = 3072
  max_positions: int = 1024
  norm: str = "pre_layernorm"  # GPT-1: post_layernorm; GPT-2: pre_layernorm; modern: pre_rmsnorm
  positions: str = "learned"  # or "rope"
  rope_theta: float = 10_000.0
  mlp: str = "gelu"  # GELU (tanh approximation, as GPT) or "swiglu"
  use_bias: bool = True
  tie_embeddings: bool = True
  dropout_rate: float = 0.1  # embeddings, residual branches and attention probabilities
  norm_eps: float = 1e-5
  init_std: float = 0.02
  scale_residual_init: bool = True  # GPT-2: residual projections start at std / √(2·layers)
  dtype: str = "float32"  # compute dtype; parameters stay float32 (master weights)
  scan_layers: bool = True  # False: the same stacked parameters in a Python loop (debugging)
  scan_unroll: int | bool = 1  # layers per scan iteration; True: unrolled (faster on CPU)
  remat_policy: str = "none"  # or a jax.checkpoint_policies name, e.g. 'nothing_saveable'

  def __post_init__(self):
    check_stack_options("GptConfig", self.remat_policy, self.scan_unroll)
    checks = [(self.norm in NORMS, f"norm={self.norm!r}; valid: {NORMS}"),
              (self.positions in POSITIONS, f"positions={self.positions!r}; valid: {POSITIONS}"),
              (self.mlp in MLPS, f"mlp={self.mlp!r}; valid: {MLPS}"),
              (self.head_dim or not self.hidden % self.num_heads,
               f"hidden={self.hidden} is not divisible by num_heads={self.num_heads}"),
              (not self.num_heads % (self.num_kv_heads or self.num_heads),
               f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
               f"{self.num_kv_heads}")]
    for ok, message in checks:
      if not ok:
        raise UserError(f"GptConfig.{message}")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def head_size(self) -> int:
    return self.head_dim or self.hidden // self.num_heads


class DecoderLayer(nnx.Module):
  def __init__(self, cfg: GptConfig, *, rngs: nnx.Rngs):
    self.post_ln = cfg.norm == "post_layernorm"
    norm_cls = RMSNorm if cfg.norm == "pre_rmsnorm" else LayerNorm
    out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.scale_residual_init else None
    common = dict(use_bias=cfg.use_bias, init_std=cfg.init_std, out_init_std=out_std,
                  dtype=cfg.dtype, rngs=rngs)
    self.attention_norm = norm_cls(cfg.hidden, epsilon=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.attention = MultiHeadAttention(
        cfg.hidden, cfg.num_heads, num_kv_heads=cfg.kv_heads, head_dim=cfg.head_size,
        rope_theta=cfg.rope_theta if cfg.positions == "rope" else None,
        dropout_rate=cfg.dropout_rate, **common)
    self.mlp_norm = norm_cls(cfg.hidden, epsilon=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.mlp = (GatedMlp(cfg.hidden, cfg.mlp_dim, jax.nn.silu, **common) if cfg.mlp == "swiglu"
                else Mlp(cfg.hidden, cfg.mlp_dim, jax.nn.gelu, **common))
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, h_BLD, mask_B1LS, positions_BL, cache=None, *, index=None, rngs=None):
    """(h, this layer's updated (keys, values) when decoding through `cache`, else None)."""
    det = rngs is None
    attend = lambda x: self.attention(x, mask_B1LS, positions_BL=positions_BL,
                                      cache=None if cache is None else (*cache, index),
                                      rngs=rngs)
    if self.post_ln:
      a_BLD, kv = attend(h_BLD)
      a_BLD = self.attention_norm(h_BLD + self.dropout(a_BLD, rngs=rngs, deterministic=det))
      h_BLD = self.mlp_norm(a_BLD + self.dropout(self.mlp(a_BLD), rngs=rngs, deterministic=det))
    else:
      a_BLD, kv = attend(self.attention_norm(h_BLD))
      h_BLD = h_BLD + self.dropout(a_BLD, rngs=rngs, deterministic=det)
      h_BLD = h_BLD + self.dropout(self.mlp(self.mlp_norm(h_BLD)), rngs=rngs, deterministic=det)
    return constrain(h_BLD, ("batch", "length", "act_embed")), None if cache is None else kv


class Gpt(nnx.Module):
  """Token (+ position) embeddings, the decoder stack, the final norm and the LM head."""

  def __init__(self, cfg: GptConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    common = dict(init_std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    self.token_embed = Embed(cfg.vocab_size, cfg.hidden, ("vocab", "embed"), **common)
    if cfg.positions == "learned":
      self.position_embed = Embed(cfg.max_positions, cfg.hidden, ("position", "embed"),
                                  **common)
    self.dropout = nnx.Dropout(cfg.dropout_rate)
    self.layers = Stack(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers, rngs=rngs,
                        scan=cfg.scan_layers, unroll=cfg.scan_unroll,
                        remat_policy=cfg.remat_policy)
    if cfg.norm != "post_layernorm":  # pre-LN stacks end un-normalised: GPT-2 adds a final LN
      norm_cls = RMSNorm if cfg.norm == "pre_rmsnorm" else LayerNorm
      self.final_norm = norm_cls(cfg.hidden, epsilon=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
    if not cfg.tie_embeddings:
      self.lm_head = Dense(cfg.hidden, cfg.vocab_size, ("embed", "vocab"), role="head",
                           use_bias=False, **common)

  # The network ------------------------------------------------------------------------------

  def hidden_states(self, tokens_BL, positions_BL, mask_B1LS, cache: KVCache | None = None,
                    rngs=None):
    """Final hidden states [B, L, D] and, decoding through `cache`, the stack's updated
    (keys, values)."""
    h_BLD = self.token_embed(tokens_BL)
    if self.cfg.positions == "learned":
      h_BLD = h_BLD + self.position_embed(positions_BL)
    h_BLD = self.dropout(h_BLD, rngs=rngs, deterministic=rngs is None)
    h_BLD = constrain(h_BLD, ("batch", "length", "act_embed"))
    h_BLD, kvs = self.layers(
        h_BLD, mask_B1LS, positions_BL, rngs=rngs,
        xs=None if cache is None else (cache.keys[0], cache.values[0]),
        index=None if cache is None else cache.index)
    if self.cfg.norm != "post_layernorm":
      h_BLD = self.final_norm(h_BLD)
    return h_BLD, kvs

  def logits(self, h_BLD):
    if self.cfg.tie_embeddings:
      logits_BLV = self.token_embed.attend(h_BLD)
    else:
      logits_BLV = self.lm_head(h_BLD)
    return constrain(logits_BLV, ("batch", "length", "act_vocab"))

  def __call__(self, tokens_BL, *, positions_BL=None, segment_ids_BL=None, rngs=None,
               return_hidden: bool = False):
    """Next-token logits [B, L, V] for (packed) training and scoring.

    `segment_ids_BL` numbers the documents packed into a row (0 = padding); without it the
    row is one document. `positions_BL` restart at 0 in each document.
    """
    length = tokens_BL.shape[1]
    self._check_length(length)
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones_like(tokens_BL)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(length), tokens_BL.shape)
    h_BLD, _ = self.hidden_states(tokens_BL, positions_BL,
                                  SegmentMask(segment_ids_BL, segment_ids_BL, causal=True),
                                  rngs=rngs)
    return h_BLD if return_hidden else self.logits(h_BLD)

  # Incremental decoding ------------------------------------------------------------------------

  def init_cache(self, batch: int, slots: int) -> KVCache:
    self._check_length(slots)
    return KVCache.zeros(batch, slots, [self.cfg.num_layers], self.cfg.kv_heads,
                         self.cfg.head_size, dtype=self.cfg.dtype)

  def decode(self, tokens_BL, positions_BL, valid_BL, cache: KVCache, last_only: bool = False):
    """Runs L new tokens (a prompt, or one sampled token) through the cache.

    Query slot index + i sees every valid slot ≤ index + i. Returns (logits [B, L, V], cache).
    """
    mask_B1LS, valid_BS = cache.attend(valid_BL)
    h_BLD, (keys, values) = self.hidden_states(tokens_BL, positions_BL, mask_B1LS, cache)
    new_cache = cache.advance([keys], [values], valid_BS, tokens_BL.shape[1])
    return self.logits(h_BLD[:, -1:] if last_only else h_BLD), new_cache

  # Accounting ------------------------------------------------------------------------------------

  def train_flops_per_token(self, seq_len: int, targets_len: int | None = None) -> float:
    del targets_len  # one sequence (inputs ++ targets when concatenated)
    return flops_per_token(self.cfg, seq_len)

  def _check_length(self, length: int) -> None:
    if self.cfg.positions == "learned" and length > self.cfg.max_positions:
      raise UserError(f"sequence length {length} exceeds the model's max_positions="
                      f"{self.cfg.max_positions}: shorten it or raise GptConfig.max_positions")


class GptClassifier(Gpt):
  """GPT-1's finetuning head: softmax(h_last W_y) on the final ([EXTRACT]) token.

  A subclass, so the pretrained decoder's parameters keep their paths and `train.init_from`
  loads them; only `classifier` starts from scratch.
  """
  finetuning_head = ("^classifier/",)  # what trains beside a parameter-efficient method

  def __init__(self, cfg: GptConfig, num_classes: int, *, rngs: nnx.Rngs):
    super().__init__(cfg, rngs=rngs)
    self.num_classes = num_classes
    self.classifier = Dense(cfg.hidden, num_classes, ("embed", None), role="head",
                            init_std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)

  def classify(self, h_BD):
    return self.classifier(h_BD)


@gin.configurable
def gpt(seed: int, cfg: GptConfig = gin.REQUIRED) -> Gpt:
  """The trainer's model factory: `factory(seed) -> module`."""
  return Gpt(cfg, rngs=nnx.Rngs(seed))


@gin.configurable
def gpt_classifier(seed: int, cfg: GptConfig = gin.REQUIRED,
                   num_classes: int = gin.REQUIRED) -> GptClassifier:
  return GptClassifier(cfg, num_classes, rngs=nnx.Rngs(seed))


def param_count(cfg: GptConfig) -> int:
  """Parameters by formula (the published counts: GPT-1 116.5M, GPT-2 small 124.4M)."""
  d, f, h, g, k = cfg.hidden, cfg.mlp_dim, cfg.num_heads, cfg.kv_heads, cfg.head_size
  bias = cfg.use_bias
  norm = d if cfg.norm == "pre_rmsnorm" else 2 * d
  attention = d * k * (h + 2 * g) + h * k * d + (bias and (k * (h + 2 * g) + d))
  mlp = (3 * d * f if cfg.mlp == "swiglu" else 2 * d * f) + (bias and (
      (2 * f if cfg.mlp == "swiglu" else f) + d))
  layer = attention + mlp + 2 * norm
  embeddings = cfg.vocab_size * d + (cfg.max_positions * d if cfg.positions == "learned" else 0)
  final = 0 if cfg.norm == "post_layernorm" else norm
  head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
  return embeddings + cfg.num_layers * layer + final + head


def flops_per_token(cfg: GptConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 × (matmul parameters + causal attention's QKᵀ and AV)."""
  d, f, l = cfg.hidden, cfg.mlp_dim, cfg.num_layers
  k, h, g = cfg.head_size, cfg.num_heads, cfg.kv_heads
  projections = d * k * (h + 2 * g) + h * k * d + (3 if cfg.mlp == "swiglu" else 2) * d * f
  attention = h * k * seq_len  # QKᵀ and AV, halved by the causal mask: 2 × L/2 per query
  return 6.0 * (l * (projections + attention) + d * cfg.vocab_size)
