"""Which `dot_general` each projection uses: one gin-configurable policy for every matmul.

Every projection asks for its matmul by role when it is built:

    attention   q, k, v and output projections
    mlp         feed-forward (and expert) projections
    head        output heads: tied or untied vocabulary projections, poolers, classifiers

so quantised or FP8 matmuls are one binding, for all roles or for one:

    dot_general_for.default = @my_fp8_dot_general
    dot_general_for.overrides = {'head': @jax.lax.dot_general}   # keep the head in full precision
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import gin
import jax

ROLES = ("attention", "mlp", "head")


@gin.configurable
def dot_general_for(role: str, default: Callable = jax.lax.dot_general,
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
