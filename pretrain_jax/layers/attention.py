"""Multi-head dot-product attention: heads as a logical axis, grouped-query keys and values,
optional rotary positions, and a key/value cache for incremental decoding."""

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.layers.linear import Dense
from pretrain_jax.layers.rope import apply_rope
from pretrain_jax.layers.sharding import constrain


def padding_mask(valid_BL: jax.Array) -> jax.Array:
  """[B, 1, 1, L] mask: every query attends to the real keys (padded queries are never read)."""
  return valid_BL[:, None, None, :]


def segment_mask(segment_ids_BL: jax.Array, causal: bool) -> jax.Array:
  """[B, 1, L, L]: query i sees key j of its own document (segment 0 is padding), and with
  `causal` only j ≤ i. Packed rows hold several documents; none attends across a boundary."""
  same_BLL = segment_ids_BL[:, :, None] == segment_ids_BL[:, None, :]
  mask_BLL = same_BLL & (segment_ids_BL != 0)[:, None, :]
  if causal:
    length = segment_ids_BL.shape[1]
    mask_BLL &= jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
  return mask_BLL[:, None]


def causal_mask(segment_ids_BL: jax.Array) -> jax.Array:
  return segment_mask(segment_ids_BL, causal=True)


def cache_mask(valid_BS: jax.Array, index: jax.Array, valid_BL: jax.Array):
  """Writes this call's L tokens at slots index … index + L − 1 of a cache's validity, and
  returns ([B, 1, L, S] mask: query slot index + i sees every valid slot ≤ it, new validity)."""
  valid_BS = jax.lax.dynamic_update_slice(valid_BS, valid_BL, (0, index))
  query_slot_L = index + jnp.arange(valid_BL.shape[1])
  causal_LS = jnp.arange(valid_BS.shape[1])[None, :] <= query_slot_L[:, None]
  return (causal_LS[None] & valid_BS[:, None, :])[:, None], valid_BS


class MultiHeadAttention(nnx.Module):
  """softmax(Q Kᵀ / √d_k) V over H heads (Vaswani et al. 2017).

  `num_kv_heads` < `num_heads` is grouped-query attention (Ainslie et al. 2023): each key/value
  head serves num_heads / num_kv_heads query heads. With `rope_theta`, queries and keys are
  rotated by their positions. Without attention dropout it calls `jax.nn.dot_product_attention`
  (fused kernels on GPU); with dropout it spells the softmax out, since the fused call cannot
  drop probabilities.
  """

  def __init__(self, features: int, num_heads: int, *, num_kv_heads: int | None = None,
               head_dim: int | None = None, rope_theta: float | None = None,
               dropout_rate: float = 0.0, use_bias: bool = True, init_std: float = 0.02,
               query_init_std: float | None = None, out_init_std: float | None = None,
               logit_scale: float | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    head_dim = head_dim or features // num_heads
    num_kv_heads = num_kv_heads or num_heads
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    dense = dict(use_bias=use_bias, init_std=init_std, dtype=dtype, param_dtype=param_dtype,
                 rngs=rngs)
    self.query = Dense(features, (num_heads, head_dim), ("embed", "heads", "kv"),
                       **{**dense, "init_std": query_init_std or init_std})
    self.key = Dense(features, (num_kv_heads, head_dim), ("embed", "heads", "kv"), **dense)
    self.value = Dense(features, (num_kv_heads, head_dim), ("embed", "heads", "kv"), **dense)
    self.out = Dense((num_heads, head_dim), features, ("heads", "kv", "embed"),
                     **{**dense, "init_std": out_init_std or init_std})
    self.dropout = nnx.Dropout(dropout_rate)
    self.dropout_rate, self.rope_theta = dropout_rate, rope_theta
    self.logit_scale = logit_scale  # None: 1/√head_dim; T5 folds it into the query init (1.0)

  def __call__(self, x_BLD: jax.Array, mask_B1LS: jax.Array, *,
               positions_BL: jax.Array | None = None,
               cache: tuple[jax.Array, jax.Array, jax.Array] | None = None,
               context_BSD: jax.Array | None = None,
               context_kv: tuple[jax.Array, jax.Array] | None = None,
               bias_BHLS: jax.Array | None = None, rngs: nnx.Rngs | None = None):
    """Returns (output, (keys, values)).

    `cache` = (keys_BSHK, values_BSHK, index): this call's keys and values are written at
    slots index … index + L − 1 and the queries attend over all S slots (as `mask_B1LS`
    allows); the updated arrays are returned. Without a cache, S = L.
    Cross-attention reads keys and values from `context_BSD` (or, when decoding, from their
    projections computed once, `context_kv`). `bias_BHLS` is added to the logits (T5's
    relative position bias, [1 or B, H, L, S]).
    """
    names = ("batch", "length", "act_heads", "act_kv")
    q_BLHK = constrain(self.query(x_BLD), names)
    if context_kv is not None:
      k_BLGK, v_BLGK = context_kv
    else:
      source_BSD = x_BLD if context_BSD is None else context_BSD
      k_BLGK = constrain(self.key(source_BSD), names)
      v_BLGK = constrain(self.value(source_BSD), names)
    if self.rope_theta is not None:
      if positions_BL is None:
        positions_BL = jnp.broadcast_to(jnp.arange(x_BLD.shape[1]), x_BLD.shape[:2])
      q_BLHK = apply_rope(q_BLHK, positions_BL, self.rope_theta)
      k_BLGK = apply_rope(k_BLGK, positions_BL, self.rope_theta)
    if cache is not None:
      keys_BSGK, values_BSGK, index = cache
      k_BLGK = jax.lax.dynamic_update_slice(keys_BSGK, k_BLGK.astype(keys_BSGK.dtype),
                                            (0, index, 0, 0))
      v_BLGK = jax.lax.dynamic_update_slice(values_BSGK, v_BLGK.astype(values_BSGK.dtype),
                                            (0, index, 0, 0))
    k_BSGK, v_BSGK = k_BLGK.astype(q_BLHK.dtype), v_BLGK.astype(q_BLHK.dtype)
    scale = self.logit_scale if self.logit_scale is not None else q_BLHK.shape[-1] ** -0.5
    if bias_BHLS is not None:
      bias_BHLS = bias_BHLS.astype(q_BLHK.dtype)
    if rngs is None or self.dropout_rate == 0.0:
      out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BSGK, v_BSGK, bias=bias_BHLS,
                                              mask=mask_B1LS, scale=scale)
    else:
      groups = q_BLHK.shape[2] // k_BSGK.shape[2]
      k_BSHK, v_BSHK = (jnp.repeat(t, groups, axis=2) for t in (k_BSGK, v_BSGK))
      logits_BHLS = jnp.einsum("bqhk,bthk->bhqt", q_BLHK * scale, k_BSHK)
      if bias_BHLS is not None:
        logits_BHLS = logits_BHLS + bias_BHLS
      logits_BHLS = jnp.where(mask_B1LS, logits_BHLS, jnp.finfo(logits_BHLS.dtype).min)
      probs_BHLS = jax.nn.softmax(logits_BHLS.astype(jnp.float32)).astype(v_BSHK.dtype)
      probs_BHLS = self.dropout(probs_BHLS, rngs=rngs)
      out_BLHK = jnp.einsum("bhqt,bthk->bqhk", probs_BHLS, v_BSHK)
    out_BLD = constrain(self.out(out_BLHK), ("batch", "length", "act_embed"))
    return out_BLD, (k_BLGK, v_BLGK)
