"""Rotary position embeddings (Su et al. 2021): rotate (q, k) pairs by position-dependent angles.

Pair i of a head's features turns by position · θ^(−2i/d), so q·k depends only on the offset
between two positions. The half-split pairing (feature i with i + d/2) is the one GPT-NeoX and
Llama use.
"""

import jax
import jax.numpy as jnp


def apply_rope(x_BLHK: jax.Array, positions_BL: jax.Array, theta: float = 10_000.0) -> jax.Array:
  half = x_BLHK.shape[-1] // 2
  inv_freq_K = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles_BLK = positions_BL[..., None].astype(jnp.float32) * inv_freq_K
  cos, sin = jnp.cos(angles_BLK)[:, :, None], jnp.sin(angles_BLK)[:, :, None]
  x1, x2 = jnp.split(x_BLHK.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x_BLHK.dtype)
