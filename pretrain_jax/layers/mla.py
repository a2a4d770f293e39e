"""Multi-head latent attention (DeepSeek-V2 §2.1): keys and values through a low-rank latent.

    c_Q = W_DQ h,   [q_C; q_R] = W_UQ RMSNorm(c_Q),   q_R ← RoPE(q_R)          (per head)
    c_KV = RMSNorm(W_DKV h),   k_R = RoPE(W_KR h)                 (one k_R shared by all heads)
    k_C = W_UK c_KV,   v = W_UV c_KV
    o = softmax([q_C; q_R] · [k_C; k_R]ᵀ / √(d_h + d_h^R)) v,   out = W_O o

An inference cache needs only c_KV and k_R per token ((d_c + d_h^R) numbers against MHA's
2 · H · d_h); `q_lora_rank` None projects the queries directly (V2-Lite). Decoding never
up-projects the cache: W_UK is absorbed into the query and W_UV applied after the weighted sum,

    q_C · k_C = (W_UKᵀ q_C) · c_KV,     Σ_s p_s v_s = W_UV Σ_s p_s c_KV,s

so attention over the cache is multi-query attention with one key [c_KV; k_R] per token,
value c_KV, and queries [W_UKᵀ q_C; q_R] (the same kernel, `dot_product_attention`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.layers.attention import dot_product_attention
from pretrain_jax.layers.linear import Dense, RMSNorm
from pretrain_jax.layers.rope import apply_rope
from pretrain_jax.layers.sharding import constrain


class MultiHeadLatentAttention(nnx.Module):

  def __init__(self, features: int, num_heads: int, *, q_lora_rank: int | None,
               kv_lora_rank: int, qk_nope_dim: int, qk_rope_dim: int, v_head_dim: int,
               rope_theta: float = 10_000.0, norm_eps: float = 1e-6, init_std: float = 0.02,
               out_init_std: float | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    dense = dict(role="attention", use_bias=False, init_std=init_std, dtype=dtype,
                 param_dtype=param_dtype, rngs=rngs)
    norm = dict(epsilon=norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    qk_dim = qk_nope_dim + qk_rope_dim
    if q_lora_rank is None:
      self.query = Dense(features, (num_heads, qk_dim), ("embed", "heads", "kv"), **dense)
    else:
      self.query_down = Dense(features, q_lora_rank, ("embed", "q_lora"), **dense)
      self.query_norm = RMSNorm(q_lora_rank, axis="q_lora", **norm)
      self.query_up = Dense(q_lora_rank, (num_heads, qk_dim), ("q_lora", "heads", "kv"), **dense)
    self.kv_down = Dense(features, kv_lora_rank, ("embed", "kv_lora"), **dense)
    self.kv_norm = RMSNorm(kv_lora_rank, axis="kv_lora", **norm)
    self.key_rope = Dense(features, qk_rope_dim, ("embed", "kv"), **dense)
    self.key_up = Dense(kv_lora_rank, (num_heads, qk_nope_dim), ("kv_lora", "heads", "kv"),
                        **dense)
    self.value_up = Dense(kv_lora_rank, (num_heads, v_head_dim), ("kv_lora", "heads", "kv"),
                          **dense)
    self.out = Dense((num_heads, v_head_dim), features, ("heads", "kv", "embed"),
                     **{**dense, "init_std": out_init_std or init_std})
    self.qk_nope_dim, self.qk_rope_dim, self.rope_theta = qk_nope_dim, qk_rope_dim, rope_theta
    self.scale = qk_dim ** -0.5

  def queries(self, x_BLD, positions_BL):
    """[q_C; RoPE(q_R)]: [B, L, H, d_h + d_h^R]."""
    if hasattr(self, "query"):
      q_BLHK = self.query(x_BLD)
    else:
      q_BLHK = self.query_up(self.query_norm(self.query_down(x_BLD)))
    q_nope, q_rope = jnp.split(q_BLHK, [self.qk_nope_dim], axis=-1)
    return q_nope, apply_rope(q_rope, positions_BL, self.rope_theta)

  def latents(self, x_BLD, positions_BL):
    """What a cache keeps per token: c_KV [B, L, d_c] and RoPE(k_R) [B, L, d_h^R]."""
    c_BLC = self.kv_norm(self.kv_down(x_BLD))
    k_rope_BLR = apply_rope(self.key_rope(x_BLD)[:, :, None], positions_BL, self.rope_theta)
    return c_BLC, k_rope_BLR[:, :, 0]

  def decode(self, x_BLD, mask_B1LS, positions_BL, cache):
    """L new tokens through a latent cache (c_KV [B, S, 1, d_c], k_R [B, S, 1, d_h^R], write
    index): returns (output [B, L, D], the updated cache arrays)."""
    latents_BSC, k_rope_BSR, index = cache
    q_nope_BLHN, q_rope_BLHR = self.queries(x_BLD, positions_BL)
    c_BLC, k_rope_BLR = self.latents(x_BLD, positions_BL)
    write = lambda cache_BS1X, new_BLX: jax.lax.dynamic_update_slice(
        cache_BS1X, new_BLX[:, :, None].astype(cache_BS1X.dtype), (0, index, 0, 0))
    latents_BSC, k_rope_BSR = write(latents_BSC, c_BLC), write(k_rope_BSR, k_rope_BLR)
    w_uk_CHN = self.key_up.kernel[...].astype(q_nope_BLHN.dtype)
    q_absorbed_BLHC = jnp.einsum("blhn,chn->blhc", q_nope_BLHN, w_uk_CHN)
    q_BLHK = jnp.concatenate([q_absorbed_BLHC, q_rope_BLHR], axis=-1)
    k_BS1K = jnp.concatenate([latents_BSC, k_rope_BSR], axis=-1).astype(q_BLHK.dtype)
    context_BLHC = dot_product_attention(q_BLHK, k_BS1K, latents_BSC.astype(q_BLHK.dtype),
                                         mask_B1LS, scale=self.scale)
    w_uv_CHV = self.value_up.kernel[...].astype(context_BLHC.dtype)
    out_BLHV = jnp.einsum("blhc,chv->blhv", context_BLHC, w_uv_CHV)
    return self.out(out_BLHV), (latents_BSC, k_rope_BSR)

  def __call__(self, x_BLD: jax.Array, mask_B1LS, positions_BL: jax.Array) -> jax.Array:
    """Training and scoring: keys and values up-projected from the latents."""
    names = ("batch", "length", "act_heads", "act_kv")
    q_nope_BLHN, q_rope_BLHR = self.queries(x_BLD, positions_BL)
    c_BLC, k_rope_BLR = self.latents(x_BLD, positions_BL)
    heads = q_nope_BLHN.shape[2]
    k_BLHK = jnp.concatenate(
        [self.key_up(c_BLC),
         jnp.broadcast_to(k_rope_BLR[:, :, None], (*k_rope_BLR.shape[:2], heads,
                                                   k_rope_BLR.shape[-1]))], axis=-1)
    q_BLHK = constrain(jnp.concatenate([q_nope_BLHN, q_rope_BLHR], axis=-1), names)
    v_BLHV = constrain(self.value_up(c_BLC), names)
    out_BLHV = dot_product_attention(q_BLHK, constrain(k_BLHK, names).astype(q_BLHK.dtype),
                                     v_BLHV.astype(q_BLHK.dtype), mask_B1LS, scale=self.scale)
    return constrain(self.out(out_BLHV), ("batch", "length", "act_embed"))
