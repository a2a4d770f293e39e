"""The one cross-entropy every objective uses (masked LM, causal LM, classification, T5)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_NV: jax.Array, labels_N: jax.Array, weights_N: jax.Array | None = None):
  """Weighted softmax cross-entropy over any leading shape N, in float32.

  Returns sums, so callers build exact (numerator, denominator) metrics:
  (Σ w·CE, Σ w·[argmax = label], Σ w, Σ w·(log Z)²) — the last feeds a z-loss
  (z_loss · mean log Z², which keeps the softmax normaliser near 1; T5X uses 1e-4). log Z is
  computed once for both.
  """
  logits_NV = logits_NV.astype(jnp.float32)
  weights_N = (jnp.ones(labels_N.shape, jnp.float32) if weights_N is None
               else weights_N.astype(jnp.float32))
  log_z_N = jax.nn.logsumexp(logits_NV, axis=-1)
  ce_N = log_z_N - jnp.take_along_axis(logits_NV, labels_N[..., None], axis=-1)[..., 0]
  correct_N = (jnp.argmax(logits_NV, -1) == labels_N).astype(jnp.float32)
  return ((ce_N * weights_N).sum(), (correct_N * weights_N).sum(), weights_N.sum(),
          (jnp.square(log_z_N) * weights_N).sum())
