"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pretrain_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy (argmax). top_k 0 and top_p 1.0 disable those filters."""
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if self.temperature < 0:
      raise UserError(f"temperature={self.temperature}; it must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise UserError(f"top_k={self.top_k}; it must be >= 0 (0 keeps every token)")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p={self.top_p}; it must lie in (0, 1]")

  def filter(self, logits_BV: jax.Array) -> jax.Array:
    """Tempered logits with the tokens outside top-k / the top-p nucleus set to -inf."""
    logits_BV = logits_BV.astype(jnp.float32) / self.temperature
    if self.top_k and self.top_k < logits_BV.shape[-1]:
      kth_B1 = jax.lax.top_k(logits_BV, self.top_k)[0][:, -1:]
      logits_BV = jnp.where(logits_BV < kth_B1, -jnp.inf, logits_BV)
    if self.top_p < 1.0:
      # Holtzman et al. 2019: the smallest set of most likely tokens whose mass reaches p.
      sorted_BV = jnp.sort(logits_BV, axis=-1)[:, ::-1]
      probs_BV = jax.nn.softmax(sorted_BV, axis=-1)
      mass_before_BV = jnp.cumsum(probs_BV, axis=-1) - probs_BV
      kept_BV = mass_before_BV < self.top_p  # the first token is always kept
      cutoff_B1 = jnp.min(jnp.where(kept_BV, sorted_BV, jnp.inf), axis=-1, keepdims=True)
      logits_BV = jnp.where(logits_BV < cutoff_B1, -jnp.inf, logits_BV)
    return logits_BV

  def __call__(self, logits_BV: jax.Array, key: jax.Array) -> jax.Array:
    if self.temperature == 0.0:
      return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, self.filter(logits_BV), axis=-1).astype(jnp.int32)
