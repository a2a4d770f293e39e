"""Multi-head dot-product attention with heads as a logical axis."""

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.layers.linear import Dense
from pretrain_jax.training.partitioning import constrain


def padding_mask(valid_BL: jax.Array) -> jax.Array:
  """[B, 1, 1, L] mask: every query attends to the real keys (padded queries are never read)."""
  return valid_BL[:, None, None, :]


class MultiHeadAttention(nnx.Module):
  """softmax(Q Kᵀ / √d_k) V over H heads (Vaswani et al. 2017), projections with biases.

  Without attention dropout it calls `jax.nn.dot_product_attention` (fused kernels on GPU);
  with dropout it spells the softmax out, since the fused call cannot drop probabilities.
  """

  def __init__(self, features: int, num_heads: int, *, head_dim: int | None = None,
               dropout_rate: float = 0.0, use_bias: bool = True, init_std: float = 0.02,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    head_dim = head_dim or features // num_heads
    dense = dict(use_bias=use_bias, init_std=init_std, dtype=dtype, param_dtype=param_dtype,
                 rngs=rngs)
    self.query = Dense(features, (num_heads, head_dim), ("embed", "heads", "kv"), **dense)
    self.key = Dense(features, (num_heads, head_dim), ("embed", "heads", "kv"), **dense)
    self.value = Dense(features, (num_heads, head_dim), ("embed", "heads", "kv"), **dense)
    self.out = Dense((num_heads, head_dim), features, ("heads", "kv", "embed"), **dense)
    self.dropout = nnx.Dropout(dropout_rate)
    self.dropout_rate = dropout_rate

  def __call__(self, x_BLD: jax.Array, mask_B11L: jax.Array, *,
               rngs: nnx.Rngs | None = None) -> jax.Array:
    names = ("batch", "length", "act_heads", "act_kv")
    q_BLHK = constrain(self.query(x_BLD), names)
    k_BLHK = constrain(self.key(x_BLD), names)
    v_BLHK = constrain(self.value(x_BLD), names)
    if rngs is None or self.dropout_rate == 0.0:
      out_BLHK = jax.nn.dot_product_attention(q_BLHK, k_BLHK, v_BLHK, mask=mask_B11L)
    else:
      scale = q_BLHK.shape[-1] ** -0.5
      logits_BHLL = jnp.einsum("bqhk,bthk->bhqt", q_BLHK * scale, k_BLHK)
      logits_BHLL = jnp.where(mask_B11L, logits_BHLL, jnp.finfo(logits_BHLL.dtype).min)
      probs_BHLL = jax.nn.softmax(logits_BHLL.astype(jnp.float32)).astype(v_BLHK.dtype)
      probs_BHLL = self.dropout(probs_BHLL, rngs=rngs)
      out_BLHK = jnp.einsum("bhqt,bthk->bqhk", probs_BHLL, v_BLHK)
    return constrain(self.out(out_BLHK), ("batch", "length", "act_embed"))
