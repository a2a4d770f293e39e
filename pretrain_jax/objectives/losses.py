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
  log_z_N, label_logit_N = log_normaliser_and_label_logit(logits_NV, labels_N)
  ce_N = log_z_N - label_logit_N
  correct_N = (jnp.argmax(logits_NV, -1) == labels_N).astype(jnp.float32)
  return ((ce_N * weights_N).sum(), (correct_N * weights_N).sum(), weights_N.sum(),
          (jnp.square(log_z_N) * weights_N).sum())


@jax.custom_vjp
def log_normaliser_and_label_logit(logits_NV: jax.Array, labels_N: jax.Array):
  """(log Σ exp(logits), logits[label]) per row, with a one-pass gradient.

  Autodiff of logsumexp + take_along_axis sweeps the [N, V] logits several times: a scatter
  of the label cotangents into zeros, a softmax, their sum, and a transpose. The backward here
  is one elementwise fusion, g_z · softmax + g_label · onehot, which matters when V is a
  vocabulary (docs/benchmarks.md).
  """
  return _forward(logits_NV, labels_N)[0]


def _forward(logits_NV, labels_N):
  log_z_N = jax.nn.logsumexp(logits_NV, axis=-1)
  label_logit_N = jnp.take_along_axis(logits_NV, labels_N[..., None], axis=-1)[..., 0]
  return (log_z_N, label_logit_N), (logits_NV, labels_N, log_z_N)


def _backward(residuals, cotangents):
  logits_NV, labels_N, log_z_N = residuals
  g_log_z_N, g_label_N = cotangents
  onehot_NV = jnp.arange(logits_NV.shape[-1]) == labels_N[..., None]
  grad_NV = (g_log_z_N[..., None] * jnp.exp(logits_NV - log_z_N[..., None])
             + jnp.where(onehot_NV, g_label_N[..., None], 0.0))
  return grad_NV.astype(logits_NV.dtype), None


log_normaliser_and_label_logit.defvjp(_forward, _backward)
