"""Attention in three parts: the masks every family builds, the dot-product kernel as a free
function, and the multi-head module that owns the projections.

Shape letters (the full legend is in docs/design.md): B batch, L query length, S key length,
D model width, H query heads, G key/value heads (grouped-query attention: each serves
R = H / G query heads), K query/key head size, V value head size (MLA: K ≠ V).
Masks are boolean, True where a query may read a key, and broadcast over heads: [B, 1, L, S];
or a `SegmentMask`, the same rule stated by segment ids, which fused kernels (TPU splash
attention) take without the [L, S] mask ever being built.
"""

from __future__ import annotations

import gin
import jax
import jax.numpy as jnp
from flax import nnx, struct

from pretrain_jax.errors import UserError
from pretrain_jax.layers.linear import Dense
from pretrain_jax.layers.rope import apply_rope
from pretrain_jax.layers.sharding import active_spec, constrain, target_platform

IMPLEMENTATIONS = (None, "xla", "cudnn", "splash")

# Masks -----------------------------------------------------------------------------------------


def padding_mask(valid_BS: jax.Array) -> jax.Array:
  """[B, 1, 1, S]: every query reads the real keys (padded queries are never read)."""
  return valid_BS[:, None, None, :]


def segment_mask(segment_ids_BL: jax.Array, causal: bool) -> jax.Array:
  """[B, 1, L, L]: query i sees key j of its own document (segment 0 is padding), and with
  `causal` only j ≤ i. Packed rows hold several documents; none attends across a boundary."""
  return cross_mask(segment_ids_BL, segment_ids_BL, causal=causal)


def causal_mask(segment_ids_BL: jax.Array) -> jax.Array:
  return segment_mask(segment_ids_BL, causal=True)


def cross_mask(query_segments_BL: jax.Array, key_segments_BS: jax.Array,
               causal: bool = False) -> jax.Array:
  """[B, 1, L, S]: a query reads the real keys of its own segment (encoder-decoder packing:
  a decoder row's document reads only its own inputs)."""
  mask_BLS = ((query_segments_BL[:, :, None] == key_segments_BS[:, None, :])
              & (key_segments_BS != 0)[:, None, :])
  if causal:
    mask_BLS &= (jnp.arange(query_segments_BL.shape[1])[:, None]
                 >= jnp.arange(key_segments_BS.shape[1])[None, :])
  return mask_BLS[:, None]


@struct.dataclass
class SegmentMask:
  """`cross_mask(q_segments_BL, kv_segments_BS, causal)`, not yet materialised; without
  `q_segments_BL`, every query reads every real key (`padding_mask(kv_segments_BS != 0)`)."""
  kv_segments_BS: jax.Array
  q_segments_BL: jax.Array | None = None
  causal: bool = struct.field(pytree_node=False, default=False)

  def dense(self) -> jax.Array:
    if self.q_segments_BL is None:
      return padding_mask(self.kv_segments_BS != 0)
    return cross_mask(self.q_segments_BL, self.kv_segments_BS, self.causal)


def prefix_mask(segment_ids_BL: jax.Array, prefix_BL: jax.Array) -> jax.Array:
  """[B, 1, L, L]: causal, except that the prefix (a prefix LM's inputs) sees itself in both
  directions (Raffel et al. 2020, Fig. 3)."""
  both_in_prefix_BLL = prefix_BL[:, :, None] & prefix_BL[:, None, :]
  return causal_mask(segment_ids_BL) | (segment_mask(segment_ids_BL, causal=False)
                                        & both_in_prefix_BLL[:, None])


def cache_mask(valid_BS: jax.Array, index: jax.Array, valid_BL: jax.Array):
  """Writes this call's L tokens at slots index … index + L − 1 of a cache's validity, and
  returns ([B, 1, L, S] mask: query slot index + i sees every valid slot ≤ it, new validity)."""
  valid_BS = jax.lax.dynamic_update_slice(valid_BS, valid_BL, (0, index))
  query_slot_L = index + jnp.arange(valid_BL.shape[1])
  causal_LS = jnp.arange(valid_BS.shape[1])[None, :] <= query_slot_L[:, None]
  return (causal_LS[None] & valid_BS[:, None, :])[:, None], valid_BS


# The kernel ------------------------------------------------------------------------------------


@gin.configurable(allowlist=["implementation"])
def dot_product_attention(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGV: jax.Array,
                          mask_B1LS: jax.Array | SegmentMask | None = None,
                          bias_BHLS: jax.Array | None = None,
                          *, scale: float | None = None, dropout_rate: float = 0.0,
                          dropout_key: jax.Array | None = None,
                          implementation: str | None = None) -> jax.Array:
  """softmax(scale · Q Kᵀ + bias, masked) V, dropout on the probabilities: [B, L, H, V].

  `implementation` None spells the kernel out (any head sizes, dropout); 'xla' or 'cudnn'
  pass through to `jax.nn.dot_product_attention` (cuDNN's fused flash attention on GPU),
  which takes neither dropout nor K ≠ V; 'splash' is TPU splash attention (a Pallas kernel,
  run by the Pallas interpreter elsewhere), which takes a `SegmentMask` and no bias.
  """
  if implementation not in IMPLEMENTATIONS:
    raise UserError(f"dot_product_attention.implementation={implementation!r}; valid: "
                    f"{IMPLEMENTATIONS}")
  scale = q_BLHK.shape[-1] ** -0.5 if scale is None else scale
  dropout = dropout_rate > 0.0 and dropout_key is not None
  if implementation == "splash":
    if dropout or bias_BHLS is not None or not isinstance(mask_B1LS, SegmentMask):
      raise UserError("dot_product_attention.implementation='splash' takes self-attention "
                      "masked by segments (BERT, GPT), without attention dropout or a logit "
                      "bias (T5's relative positions): set the attention dropout rate to 0, "
                      "or use implementation=None for this model")
    if q_BLHK.shape[1] % 128 or k_BSGK.shape[1] % 128:
      raise UserError(f"dot_product_attention.implementation='splash' tiles queries and keys "
                      f"by 128; lengths {q_BLHK.shape[1]} and {k_BSGK.shape[1]} are not "
                      "multiples of 128: pad the sequence length, or use implementation=None")
    return splash_attention(q_BLHK, k_BSGK, v_BSGV, mask_B1LS, scale)
  if isinstance(mask_B1LS, SegmentMask):
    mask_B1LS = mask_B1LS.dense()
  if implementation is not None:
    if dropout or k_BSGK.shape[-1] != v_BSGV.shape[-1]:
      raise UserError(f"dot_product_attention.implementation={implementation!r} has no "
                      "attention dropout and needs equal q·k and v head sizes: set the "
                      "attention dropout rate to 0 or use implementation=None")
    return jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGV, bias=bias_BHLS, mask=mask_B1LS,
                                        scale=scale, implementation=implementation)
  batch, length, heads, _ = q_BLHK.shape
  groups = k_BSGK.shape[2]
  q_BLGRK = (q_BLHK * jnp.asarray(scale, q_BLHK.dtype)).reshape(
      batch, length, groups, heads // groups, -1)
  logits_BGRLS = jnp.einsum("blgrk,bsgk->bgrls", q_BLGRK, k_BSGK)
  if bias_BHLS is not None:
    logits_BGRLS += bias_BHLS.astype(logits_BGRLS.dtype).reshape(
        bias_BHLS.shape[0], groups, heads // groups, *bias_BHLS.shape[2:])
  if mask_B1LS is not None:
    logits_BGRLS = jnp.where(mask_B1LS[:, :, None], logits_BGRLS,
                             jnp.finfo(logits_BGRLS.dtype).min)
  probs_BGRLS = jax.nn.softmax(logits_BGRLS.astype(jnp.float32), axis=-1)
  if dropout:
    keep = jax.random.bernoulli(dropout_key, 1.0 - dropout_rate, probs_BGRLS.shape)
    probs_BGRLS = jnp.where(keep, probs_BGRLS / (1.0 - dropout_rate), 0.0)
  out_BLGRV = jnp.einsum("bgrls,bsgv->blgrv", probs_BGRLS.astype(v_BSGV.dtype), v_BSGV)
  return out_BLGRV.reshape(batch, length, heads, -1)


def splash_attention(q_BLHK: jax.Array, k_BSGK: jax.Array, v_BSGV: jax.Array,
                     mask: SegmentMask, scale: float) -> jax.Array:
  """TPU splash attention (flash attention that skips the masked-out blocks): [B, L, H, V].

  A Pallas kernel cannot be split by GSPMD, so under a mesh it runs in `shard_map` over the
  batch and head axes the activation rules give; off TPU the Pallas interpreter runs it (slow:
  for tests).
  """
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as masks)
  mesh = jax.sharding.get_abstract_mesh()
  interpret = target_platform() != "tpu"
  q_segments_BL = (jnp.where(mask.kv_segments_BS != 0, 1, 0) if mask.q_segments_BL is None
                   else mask.q_segments_BL)  # BERT: every query is in the one real segment

  def local(q_BLHK, k_BSGK, v_BSGV, q_segments_BL, kv_segments_BS):
    _, length, heads, _ = q_BLHK.shape
    keys = k_BSGK.shape[1]
    one = (masks.CausalMask((length, keys)) if mask.causal
           else masks.FullMask((length, keys)))
    bq, bkv = min(512, length), min(512, keys)  # the kernel's tiles: multiples of 128
    bq, bkv = bq if length % bq == 0 else 128, bkv if keys % bkv == 0 else 128
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv,
                               block_q_dkv=bq, block_kv_dkv=bkv, block_kv_dkv_compute=bkv,
                               block_q_dq=bq, block_kv_dq=bkv)
    kernel = splash.make_splash_mha(masks.MultiHeadMask([one] * heads), block_sizes=blocks,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)

    def row(q_LHK, k_SGK, v_SGV, q_segments_L, kv_segments_S):  # the kernel is head-major
      out_HLV = kernel(q_LHK.swapaxes(0, 1), k_SGK.swapaxes(0, 1), v_SGV.swapaxes(0, 1),
                       segment_ids=splash.SegmentIds(q_segments_L, kv_segments_S))
      return out_HLV.swapaxes(0, 1)

    return jax.vmap(row)(q_BLHK * jnp.asarray(scale, q_BLHK.dtype), k_BSGK, v_BSGV,
                         q_segments_BL, kv_segments_BS)

  heads = active_spec(("batch", None, "act_heads", None))
  rows = active_spec(("batch", None))
  if mesh.empty or mesh.size == 1 or heads is None:
    return local(q_BLHK, k_BSGK, v_BSGV, q_segments_BL, mask.kv_segments_BS)
  return jax.shard_map(local, mesh=mesh, in_specs=(heads, heads, heads, rows, rows),
                       out_specs=heads, check_vma=False)(
                           q_BLHK, k_BSGK, v_BSGV, q_segments_BL, mask.kv_segments_BS)


# The module ------------------------------------------------------------------------------------


class MultiHeadAttention(nnx.Module):
  """Multi-head attention (Vaswani et al. 2017) around `dot_product_attention`.

  `num_kv_heads` < `num_heads` is grouped-query attention (Ainslie et al. 2023). With
  `rope_theta`, queries and keys are rotated by their positions. `v_head_dim` may differ from
  the q·k `head_dim`.
  """

  def __init__(self, features: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, v_head_dim: int | None = None,
               rope_theta: float | None = None, dropout_rate: float = 0.0,
               use_bias: bool = True, init_std: float = 0.02,
               query_init_std: float | None = None, out_init_std: float | None = None,
               logit_scale: float | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    head_dim = head_dim or features // num_heads
    v_head_dim = v_head_dim or head_dim
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    dense = dict(role="attention", use_bias=use_bias, init_std=init_std, dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs)
    self.query = Dense(features, (num_heads, head_dim), ("embed", "heads", "kv"),
                       **{**dense, "init_std": query_init_std or init_std})
    self.key = Dense(features, (num_kv_heads, head_dim), ("embed", "heads", "kv"), **dense)
    self.value = Dense(features, (num_kv_heads, v_head_dim), ("embed", "heads", "kv"), **dense)
    self.out = Dense((num_heads, v_head_dim), features, ("heads", "kv", "embed"),
                     **{**dense, "init_std": out_init_std or init_std})
    self.dropout_rate, self.rope_theta = dropout_rate, rope_theta
    self.logit_scale = logit_scale  # None: 1/√head_dim; T5 folds it into the query init (1.0)

  def __call__(self, x_BLD: jax.Array, mask_B1LS: jax.Array, *,
               positions_BL: jax.Array | None = None,
               cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
               context_BSD: jax.Array | None = None,
               context_kv: tuple[jax.Array, jax.Array] | None = None,
               bias_BHLS: jax.Array | None = None, rngs: nnx.Rngs | None = None):
    """Returns (output [B, L, D], (keys, values)).

    `cache` = (keys_BSGK, values_BSGV, index): this call's keys and values are written at
    slots index … index + L − 1 and the queries attend over all S slots (as `mask_B1LS`
    allows); the updated arrays are returned. Without a cache, S = L.
    Cross-attention reads keys and values from `context_BSD` (or, when decoding, from their
    projections computed once, `context_kv`). `bias_BHLS` is added to the logits (T5's
    relative position bias, [1 or B, H, L, S]).
    """
    names = ("batch", "length", "act_heads", "act_kv")
    q_BLHK = constrain(self.query(x_BLD, rngs=rngs), names)
    if context_kv is not None:
      k_BSGK, v_BSGV = context_kv
    else:
      source_BSD = x_BLD if context_BSD is None else context_BSD
      k_BSGK = constrain(self.key(source_BSD, rngs=rngs), names)
      v_BSGV = constrain(self.value(source_BSD, rngs=rngs), names)
    if self.rope_theta is not None:
      if positions_BL is None:
        positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
      q_BLHK = apply_rope(q_BLHK, positions_BL, self.rope_theta)
      k_BSGK = apply_rope(k_BSGK, positions_BL, self.rope_theta)
    if cache is not None:  # this call's L keys go into the S slots
      keys_BSGK, values_BSGV, index = cache
      k_BSGK = jax.lax.dynamic_update_slice(keys_BSGK, k_BSGK.astype(keys_BSGK.dtype),
                                            (0, index, 0, 0))
      v_BSGV = jax.lax.dynamic_update_slice(values_BSGV, v_BSGV.astype(values_BSGV.dtype),
                                            (0, index, 0, 0))
    dropout_key = rngs.dropout() if rngs is not None and self.dropout_rate else None
    keys_BSGK, values_BSGV, mask_B1LS, bias_BHLS = self.read_keys(k_BSGK, v_BSGV, mask_B1LS,
                                                                  bias_BHLS)
    out_BLHV = dot_product_attention(
        q_BLHK, keys_BSGK.astype(q_BLHK.dtype), values_BSGV.astype(q_BLHK.dtype), mask_B1LS,
        bias_BHLS, scale=self.logit_scale, dropout_rate=self.dropout_rate,
        dropout_key=dropout_key)
    out_BLD = constrain(self.out(out_BLHV, rngs=rngs), ("batch", "length", "act_embed"))
    return out_BLD, (k_BSGK, v_BSGV)

  def read_keys(self, k_BSGK, v_BSGV, mask_B1LS, bias_BHLS):
    """The keys, values, mask and bias the queries read: this call's (or the cache's) as they
    are; prefix tuning (peft/prefix.py) puts its own keys in front."""
    return k_BSGK, v_BSGV, mask_B1LS, bias_BHLS
