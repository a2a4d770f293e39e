"""Which `dot_general` each projection uses: one gin-configurable policy for every matmul.

Every projection asks for its matmul by role when it is built:

    attention   q, k, v and output projections
    mlp         feed-forward (and expert) projections
    head        output heads: tied or untied vocabulary projections, poolers, classifiers

so quantised or FP8 matmuls are one binding, for all roles or for one:

    dot_general_for.default = @my_fp8_dot_general
    dot_general_for.overrides = {'head': @precision.dot_general}   # the head in full precision

The default, `dot_general`, is `jax.lax.dot_general` with a backward pass that keeps the
cotangent where a row-major matmul wants it (see its docstring); `@jax.lax.dot_general` binds
the plain one.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import gin
import jax
import jax.numpy as jnp

ROLES = ("attention", "mlp", "head")


def dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                **kwargs):
  """`jax.lax.dot_general`, same values and gradients, for x[..., K] · W (W [K, M] or [M, K]).

  Autodiff writes W's gradient as dot_general(g, x) contracting the token axis, which XLA:CPU
  canonicalises by transposing g: for a vocabulary head, a copy of the whole [tokens, vocab]
  logits gradient every step. Here the narrower of x and g is the one transposed
  (docs/benchmarks.md). Other shapes (batch dims, multi-axis contractions, 3-D kernels) are
  the plain lax.dot_general.
  """
  (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
  plain = functools.partial(jax.lax.dot_general, dimension_numbers=dimension_numbers,
                            precision=precision, preferred_element_type=preferred_element_type,
                            **kwargs)
  if (lhs_b or rhs_b or rhs.ndim != 2 or tuple(lhs_c) != (lhs.ndim - 1,)
      or tuple(rhs_c) not in ((0,), (1,))):
    return plain(lhs, rhs)
  return _matmul(plain, rhs_c[0], lhs, rhs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _matmul(plain, rhs_contracting, lhs, rhs):
  return plain(lhs, rhs)


def _matmul_forward(plain, rhs_contracting, lhs, rhs):
  return plain(lhs, rhs), (lhs, rhs)


def _matmul_backward(plain, rhs_contracting, residuals, g):
  lhs, rhs = residuals
  x_NK = lhs.reshape(-1, lhs.shape[-1])
  g_NM = g.reshape(-1, g.shape[-1]).astype(jnp.result_type(lhs, rhs))
  # d lhs = g · Wᵀ (contract M). d W contracts the tokens: a row-major matmul transposes its
  # left operand for that, so the narrower of x and g goes left.
  d_lhs = jax.lax.dot_general(g_NM, rhs, (((1,), (1 - rhs_contracting,)), ((), ())))
  tokens = (((0,), (0,)), ((), ()))
  if x_NK.shape[1] <= g_NM.shape[1]:
    d_rhs_KM = jax.lax.dot_general(x_NK, g_NM, tokens)
    d_rhs = d_rhs_KM if rhs_contracting == 0 else d_rhs_KM.T
  else:
    d_rhs_MK = jax.lax.dot_general(g_NM, x_NK, tokens)
    d_rhs = d_rhs_MK.T if rhs_contracting == 0 else d_rhs_MK
  return d_lhs.reshape(lhs.shape).astype(lhs.dtype), d_rhs.astype(rhs.dtype)


_matmul.defvjp(_matmul_forward, _matmul_backward)
gin.external_configurable(jax.lax.dot_general, module="jax.lax")
gin.external_configurable(dot_general)


@gin.configurable
def dot_general_for(role: str, default: Callable = dot_general,
                    overrides: Mapping[str, Callable] | None = None) -> Callable:
  """The `dot_general` (lax.dot_general's signature) for projections of `role`."""
  if role not in ROLES:
    raise ValueError(f"matmul role {role!r}; valid: {ROLES}")
  overrides = dict(overrides or {})
  unknown = sorted(set(overrides) - set(ROLES))
  if unknown:
    from pretrain_jax.errors import UserError  # pylint: disable=import-outside-toplevel
    raise UserError(f"dot_general_for.overrides has role {unknown[0]!r}; valid: {ROLES}")
  return overrides.get(role, default)
