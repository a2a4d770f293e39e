"""DeepSeek-V3-style decoder (DeepSeek-AI 2024): MLA attention, DeepSeekMoE feed-forward after
the first dense layers, multi-token prediction.

    h⁰ = E[x];   hˡ = u + FFN(RMSNorm(u)),   u = hˡ⁻¹ + MLA(RMSNorm(hˡ⁻¹))
    FFN = SwiGLU in the first `num_dense_layers` layers, DeepSeekMoE after (layers/moe.py)
    p(x_{i+1} | x_≤i) = softmax(RMSNorm(h_i) W_out)                    (untied)

Multi-token prediction (V3 §2.2), depth D: module k sees h_i^(k−1) (h^0 the main stack's
output) and the embedding of token i + k, and predicts token i + k + 1 through the shared
embedding and output head:

    h'_i^k = M_k [RMSNorm(h_i^(k−1)); RMSNorm(E[t_(i+k)])],   h^k = TRM_k(h'^k)
    L = L_main + (λ / D) Σ_k CE_k        (the MTP part through the auxiliary-loss channel)

Packed documents: no attention and no MTP target crosses a boundary.
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.errors import UserError
from pretrain_jax.layers.attention import SegmentMask
from pretrain_jax.layers.kv_cache import KVCache
from pretrain_jax.layers.linear import Dense, Embed, RMSNorm
from pretrain_jax.layers.mla import MultiHeadLatentAttention
from pretrain_jax.layers.mlp import GatedMlp
from pretrain_jax.layers.moe import MoeConfig, MoeMlp
from pretrain_jax.layers.sharding import constrain
from pretrain_jax.layers.stack import Stack, check_stack_options
from pretrain_jax.layers.variables import AuxLoss, AuxMetric
from pretrain_jax.objectives.losses import cross_entropy


class TrainingPasses(nnx.Variable):
  """Training forward passes seen (the MTP weight's schedule reads it)."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DeepSeekConfig:
  """Defaults are DeepSeek-V3's published dimensions (models/deepseek_v3_671b.gin)."""
  vocab_size: int = 129_280
  hidden: int = 7168
  num_layers: int = 61
  num_dense_layers: int = 3  # the first k layers keep a dense SwiGLU
  dense_mlp_dim: int = 18_432
  num_heads: int = 128
  q_lora_rank: int | None = 1536  # None: queries projected directly (V2-Lite)
  kv_lora_rank: int = 512
  qk_nope_dim: int = 128
  qk_rope_dim: int = 64
  v_head_dim: int = 128
  rope_theta: float = 10_000.0
  max_positions: int = 4096  # RoPE has no table: bounds caches and checks only
  moe: MoeConfig = dataclasses.field(default_factory=MoeConfig)
  # None: the layers after the first k (and each MTP block) are DeepSeekMoE. A width: they are
  # dense SwiGLUs of it instead, everything else unchanged (`moe` unused): the dense baselines
  # DeepSeekMoE is compared with at equal activated or total parameters
  # (scripts/deepseek_tiny_study.py)
  moe_layer_dense_dim: int | None = None
  mtp_depth: int = 1  # D; 0: no multi-token prediction
  mtp_weight: float = 0.3  # λ
  mtp_weight_late: float = 0.1
  mtp_late_after: int | None = None  # training passes after which λ = mtp_weight_late
  norm_eps: float = 1e-6
  init_std: float = 0.006
  dtype: str = "float32"  # compute dtype; parameters stay float32 (master weights)
  scan_layers: bool = True
  scan_unroll: int | bool = 1
  remat_policy: str = "none"

  def __post_init__(self):
    check_stack_options("DeepSeekConfig", self.remat_policy, self.scan_unroll)
    checks = [(0 <= self.num_dense_layers <= self.num_layers,
               f"num_dense_layers={self.num_dense_layers} must be in 0 … num_layers="
               f"{self.num_layers}"),
              (self.moe_layer_dense_dim is None or self.moe_layer_dense_dim > 0,
               f"moe_layer_dense_dim={self.moe_layer_dense_dim} must be positive (or None)"),
              (self.mtp_depth >= 0, f"mtp_depth={self.mtp_depth} must be ≥ 0"),
              (self.qk_rope_dim % 2 == 0, f"qk_rope_dim={self.qk_rope_dim} must be even")]
    for ok, message in checks:
      if not ok:
        raise UserError(f"DeepSeekConfig.{message}")

  @property
  def num_moe_layers(self) -> int:
    """Layers after the first k: DeepSeekMoE, or dense of moe_layer_dense_dim."""
    return self.num_layers - self.num_dense_layers


class DeepSeekLayer(nnx.Module):
  """Pre-RMSNorm MLA, then a dense SwiGLU or a DeepSeekMoE feed-forward.

  `moe`: a layer after the first k, DeepSeekMoE unless cfg.moe_layer_dense_dim makes it dense.
  """

  def __init__(self, cfg: DeepSeekConfig, moe: bool, *, rngs: nnx.Rngs):
    common = dict(init_std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    norm = dict(epsilon=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.attention_norm = RMSNorm(cfg.hidden, **norm)
    self.attention = MultiHeadLatentAttention(
        cfg.hidden, cfg.num_heads, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_nope_dim=cfg.qk_nope_dim, qk_rope_dim=cfg.qk_rope_dim, v_head_dim=cfg.v_head_dim,
        rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps, **common)
    self.mlp_norm = RMSNorm(cfg.hidden, **norm)
    self.is_moe = moe and cfg.moe_layer_dense_dim is None
    width = cfg.moe_layer_dense_dim if moe else cfg.dense_mlp_dim
    self.mlp = (MoeMlp(cfg.hidden, cfg.moe, **common) if self.is_moe
                else GatedMlp(cfg.hidden, width, jax.nn.silu, **common))

  def __call__(self, h_BLD, mask, positions_BL, valid_BL, cache=None, *, index=None,
               rngs=None):
    """(h, this layer's updated latent cache when decoding through `cache`, else None)."""
    x_BLD = self.attention_norm(h_BLD)
    if cache is None:
      a_BLD, new_cache = self.attention(x_BLD, mask, positions_BL), None
    else:
      a_BLD, new_cache = self.attention.decode(x_BLD, mask, positions_BL, (*cache, index))
    h_BLD = h_BLD + a_BLD
    x_BLD = self.mlp_norm(h_BLD)
    if self.is_moe:
      y_BLD = self.mlp(x_BLD, valid_BL, update_balance=rngs is not None, record=cache is None)
    else:
      y_BLD = self.mlp(x_BLD)
    return constrain(h_BLD + y_BLD, ("batch", "length", "act_embed")), new_cache


class MtpModule(nnx.Module):
  """One multi-token-prediction depth: projection M_k, one block TRM_k, its own final norm."""

  def __init__(self, cfg: DeepSeekConfig, *, rngs: nnx.Rngs):
    norm = dict(epsilon=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.hidden_norm = RMSNorm(cfg.hidden, **norm)
    self.embed_norm = RMSNorm(cfg.hidden, **norm)
    self.projection = Dense(2 * cfg.hidden, cfg.hidden, (None, "embed"), role="mlp",
                            use_bias=False, init_std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    self.block = DeepSeekLayer(cfg, moe=cfg.num_moe_layers > 0, rngs=rngs)
    self.final_norm = RMSNorm(cfg.hidden, **norm)

  def __call__(self, h_BLD, embedded_BLD, mask, positions_BL, valid_BL, rngs=None):
    x_BLD = self.projection(jnp.concatenate(
        [self.hidden_norm(h_BLD), self.embed_norm(embedded_BLD)], axis=-1))
    return self.block(x_BLD, mask, positions_BL, valid_BL, rngs=rngs)[0]


class DeepSeek(nnx.Module):
  """Embedding, dense then MoE stacks, final norm, untied head; MTP modules for training."""

  def __init__(self, cfg: DeepSeekConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    common = dict(init_std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    self.token_embed = Embed(cfg.vocab_size, cfg.hidden, ("vocab", "embed"), **common)
    stack = dict(scan=cfg.scan_layers, unroll=cfg.scan_unroll, remat_policy=cfg.remat_policy)
    if cfg.num_dense_layers:
      self.dense_layers = Stack(lambda r: DeepSeekLayer(cfg, moe=False, rngs=r),
                                cfg.num_dense_layers, rngs=rngs, **stack)
    if cfg.num_moe_layers:
      self.moe_layers = Stack(lambda r: DeepSeekLayer(cfg, moe=True, rngs=r),
                              cfg.num_moe_layers, rngs=rngs, **stack)
    self.final_norm = RMSNorm(cfg.hidden, epsilon=cfg.norm_eps, dtype=cfg.dtype, rngs=rngs)
    self.lm_head = Dense(cfg.hidden, cfg.vocab_size, ("embed", "vocab"), role="head",
                         use_bias=False, **common)
    if cfg.mtp_depth:
      self.mtp = nnx.List([MtpModule(cfg, rngs=rngs) for _ in range(cfg.mtp_depth)])
      self.mtp_loss = AuxLoss(jnp.zeros(()))  # (λ / D) Σ_k CE_k
      self.mtp_cross_entropy = AuxMetric(jnp.zeros((cfg.mtp_depth,)), reduce="each")
      self.training_passes = TrainingPasses(jnp.zeros((), jnp.int32))

  def _stacks(self):
    return [getattr(self, n) for n in ("dense_layers", "moe_layers") if hasattr(self, n)]

  def hidden_states(self, tokens_BL, positions_BL, mask, valid_BL, cache=None, rngs=None):
    """The main stack's output [B, L, D], before the final norm, and, decoding through
    `cache`, each stack's updated (latents, RoPE keys)."""
    h_BLD = constrain(self.token_embed(tokens_BL), ("batch", "length", "act_embed"))
    written = []
    for j, stack in enumerate(self._stacks()):
      h_BLD, kv = stack(h_BLD, mask, positions_BL, valid_BL, rngs=rngs,
                        xs=None if cache is None else (cache.keys[j], cache.values[j]),
                        index=None if cache is None else cache.index,
                        write_state=cache is None)
      written.append(kv)
    return h_BLD, written

  def logits(self, h_BLD):
    """Vocabulary logits of final hidden states (the final norm already applied)."""
    return constrain(self.lm_head(h_BLD), ("batch", "length", "act_vocab"))

  def __call__(self, tokens_BL, *, positions_BL=None, segment_ids_BL=None, rngs=None,
               return_hidden: bool = False):
    """Next-token logits [B, L, V] (or the normed hidden states); writes the MTP loss."""
    length = tokens_BL.shape[1]
    if length > self.cfg.max_positions:
      raise UserError(f"sequence length {length} exceeds DeepSeekConfig.max_positions="
                      f"{self.cfg.max_positions}: shorten it or raise max_positions")
    if segment_ids_BL is None:
      segment_ids_BL = jnp.ones_like(tokens_BL)
    if positions_BL is None:
      positions_BL = jnp.broadcast_to(jnp.arange(length), tokens_BL.shape)
    mask = SegmentMask(segment_ids_BL, segment_ids_BL, causal=True)
    valid_BL = segment_ids_BL != 0
    h_BLD, _ = self.hidden_states(tokens_BL, positions_BL, mask, valid_BL, rngs=rngs)
    if self.cfg.mtp_depth:
      self._multi_token_prediction(h_BLD, tokens_BL, segment_ids_BL, positions_BL, mask,
                                   valid_BL, rngs)
    h_BLD = self.final_norm(h_BLD)
    return h_BLD if return_hidden else self.logits(h_BLD)

  def _multi_token_prediction(self, h_BLD, tokens_BL, segments_BL, positions_BL, mask,
                              valid_BL, rngs):
    """Depth k at position i reads token i + k and predicts token i + k + 1 (of the same
    document); the weighted sum of the depths' mean cross-entropies is an AuxLoss."""
    cfg = self.cfg
    shift = lambda x_BL, k: jnp.pad(x_BL[:, k:], ((0, 0), (0, k)))  # x[i + k], 0 past the end
    losses = []
    for k, module in enumerate(self.mtp, start=1):
      embedded_BLD = self.token_embed(shift(tokens_BL, k))
      h_BLD = module(h_BLD, embedded_BLD, mask, positions_BL, valid_BL, rngs=rngs)
      logits_BLV = self.logits(module.final_norm(h_BLD))
      target_segments_BL = shift(segments_BL, k + 1)
      weights_BL = (valid_BL & (target_segments_BL == segments_BL)).astype(jnp.float32)
      ce, _, count, _ = cross_entropy(logits_BLV, shift(tokens_BL, k + 1), weights_BL)
      losses.append(ce / jnp.maximum(count, 1.0))
    losses_D = jnp.stack(losses)
    passes = self.training_passes[...]
    late = cfg.mtp_late_after is not None and passes >= cfg.mtp_late_after
    weight = jnp.where(late, cfg.mtp_weight_late, cfg.mtp_weight)
    self.mtp_loss[...] = weight / cfg.mtp_depth * losses_D.sum()
    self.mtp_cross_entropy[...] = jax.lax.stop_gradient(losses_D)
    if rngs is not None:
      self.training_passes[...] = passes + 1

  # Incremental decoding (the MTP modules are not used) ----------------------------------------

  def init_cache(self, batch: int, slots: int) -> KVCache:
    """MLA's compressed cache: per layer and token, c_KV (as the cache's keys) and the shared
    RoPE key k_R (as its values), one "head" each."""
    if slots > self.cfg.max_positions:
      raise UserError(f"a cache of {slots} slots exceeds DeepSeekConfig.max_positions="
                      f"{self.cfg.max_positions}: generate fewer tokens or raise it")
    layers = [n for n in (self.cfg.num_dense_layers, self.cfg.num_moe_layers) if n]
    return KVCache.zeros(batch, slots, layers, 1, self.cfg.kv_lora_rank,
                         v_head_dim=self.cfg.qk_rope_dim, dtype=self.cfg.dtype)

  def decode(self, tokens_BL, positions_BL, valid_BL, cache: KVCache, last_only: bool = False):
    """L new tokens (a prompt, or one sampled token) through the cache: (logits, cache)."""
    mask_B1LS, valid_BS = cache.attend(valid_BL)
    h_BLD, written = self.hidden_states(tokens_BL, positions_BL, mask_B1LS, valid_BL, cache)
    new_cache = cache.advance([kv[0] for kv in written], [kv[1] for kv in written], valid_BS,
                              tokens_BL.shape[1])
    h_BLD = self.final_norm(h_BLD[:, -1:] if last_only else h_BLD)
    return self.logits(h_BLD), new_cache

  def cache_bytes_per_token(self) -> dict[str, int]:
    """Cache bytes per token (compute dtype) against multi-head attention of the same heads
    and head size: (d_c + d_h^R) per layer against 2 · H · d_h."""
    cfg = self.cfg
    itemsize = jnp.dtype(cfg.dtype).itemsize
    mla = cfg.num_layers * (cfg.kv_lora_rank + cfg.qk_rope_dim) * itemsize
    mha = cfg.num_layers * 2 * cfg.num_heads * cfg.v_head_dim * itemsize
    return {"mla": mla, "mha": mha}

  # Accounting ------------------------------------------------------------------------------------

  def train_flops_per_token(self, seq_len: int, targets_len: int | None = None) -> float:
    del targets_len
    return flops_per_token(self.cfg, seq_len)

  def activated_params(self) -> int:
    return param_counts(self.cfg)["activated"]


@gin.configurable
def deepseek(seed: int, cfg: DeepSeekConfig = gin.REQUIRED) -> DeepSeek:
  """The trainer's model factory: `factory(seed) -> module`."""
  return DeepSeek(cfg, rngs=nnx.Rngs(seed))


def _layer_params(cfg: DeepSeekConfig) -> dict[str, int]:
  """Parameters of one layer's parts: attention (with its norms), the first k layers' dense
  FFN, and the later layers' FFN: all of it and what one token activates."""
  d, h = cfg.hidden, cfg.num_heads
  qk = cfg.qk_nope_dim + cfg.qk_rope_dim
  queries = (d * h * qk if cfg.q_lora_rank is None
             else d * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * h * qk)
  c = cfg.kv_lora_rank
  attention = (queries + d * c + c + d * cfg.qk_rope_dim + c * h * cfg.qk_nope_dim
               + c * h * cfg.v_head_dim + h * cfg.v_head_dim * d)
  m, width = cfg.moe, cfg.moe_layer_dense_dim
  expert = 3 * d * m.expert_dim
  always = d * m.num_experts + m.num_shared_experts * expert  # router, shared experts
  later = ((3 * d * width,) * 2 if width is not None
           else (always + m.num_experts * expert, always + m.top_k * expert))
  return {"attention": attention + 2 * d,  # + the attention and MLP norms
          "dense_mlp": 3 * d * cfg.dense_mlp_dim, "moe_ffn": later[0],
          "moe_ffn_activated": later[1]}


def param_counts(cfg: DeepSeekConfig) -> dict[str, int]:
  """Total, activated per token, and the MTP modules' (dropped at inference).

  Activated: what one token's forward pass multiplies by, so the shared and its top-k routed
  experts, and one row of the embedding table, which is looked up (the DeepSeek papers'
  convention: V2-Lite's 2.4B of 15.7B comes out as 2.45B here, V3's 37B of 671B as 36.6B).
  """
  p = _layer_params(cfg)
  dense_layer = p["attention"] + p["dense_mlp"]
  moe_layer, moe_active = p["attention"] + p["moe_ffn"], p["attention"] + p["moe_ffn_activated"]
  embeddings = 2 * cfg.vocab_size * cfg.hidden + cfg.hidden  # embedding, head, final norm
  main_total = cfg.num_dense_layers * dense_layer + cfg.num_moe_layers * moe_layer + embeddings
  main_active = (cfg.num_dense_layers * dense_layer + cfg.num_moe_layers * moe_active
                 + embeddings - (cfg.vocab_size - 1) * cfg.hidden)
  block_total, block_active = ((moe_layer, moe_active) if cfg.num_moe_layers
                               else (dense_layer, dense_layer))
  mtp_extra = 3 * cfg.hidden + 2 * cfg.hidden * cfg.hidden  # norms, projection
  return {"total": main_total, "activated": main_active,
          "mtp_total": cfg.mtp_depth * (block_total + mtp_extra),
          "mtp_activated": cfg.mtp_depth * (block_active + mtp_extra)}


def flops_per_token(cfg: DeepSeekConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 × (activated matmul parameters + causal attention), the MTP
  modules (block, projection, head) included."""
  p = _layer_params(cfg)
  d, h = cfg.hidden, cfg.num_heads
  attention = h * (cfg.qk_nope_dim + cfg.qk_rope_dim + cfg.v_head_dim) * seq_len / 2
  moe_layer = p["attention"] + p["moe_ffn_activated"] + attention
  dense_layer = p["attention"] + p["dense_mlp"] + attention
  block = moe_layer if cfg.num_moe_layers else dense_layer
  head = d * cfg.vocab_size
  main = cfg.num_dense_layers * dense_layer + cfg.num_moe_layers * moe_layer + head
  return 6.0 * (main + cfg.mtp_depth * (block + 2 * d * d + head))
