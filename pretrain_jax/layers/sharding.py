"""Logical axis names → PartitionSpecs, and activation constraints layers can call.

Layers name logical axes only (`('batch', 'length', 'act_embed')`); the rule table that maps
them to mesh axes lives in `training/partitioning.py` and is made active while the trainer
traces (`activation_rules`). Outside that context `constrain` is the identity, so a model runs
unsharded in a notebook without knowing about meshes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import jax
from jax.sharding import PartitionSpec

from pretrain_jax.errors import UserError


def logical_to_spec(names: Sequence[str | None], rules: dict) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec; unknown names are an error, not replication."""
  unknown = [n for n in names if n is not None and n not in rules]
  if unknown:
    raise UserError(f"logical axis {unknown[0]!r} has no rule in logical_axis_rules "
                    f"(known: {sorted(rules)})")
  spec, used = [], set()
  for name in names:
    axes = rules.get(name) if name is not None else None
    # A mesh axis may shard only one dimension of an array: later uses are replicated.
    axes_tuple = tuple(a for a in ((axes,) if isinstance(axes, str) else (axes or ()))
                       if a not in used)
    used.update(axes_tuple)
    spec.append(axes_tuple[0] if len(axes_tuple) == 1 else (axes_tuple or None))
  return PartitionSpec(*spec)


_ACTIVE_RULES: list[dict] = []


@contextlib.contextmanager
def activation_rules(rules: dict):
  """Within this context (entered while tracing), `constrain` applies `rules`."""
  _ACTIVE_RULES.append(rules)
  try:
    yield
  finally:
    _ACTIVE_RULES.pop()


def active_spec(names: Sequence[str | None]) -> PartitionSpec | None:
  """The PartitionSpec the active rules give `names`; None outside `activation_rules`."""
  return logical_to_spec(names, _ACTIVE_RULES[-1]) if _ACTIVE_RULES else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Annotates an activation with logical axes; a no-op outside `activation_rules`."""
  if not _ACTIVE_RULES:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(names, _ACTIVE_RULES[-1]))


def target_platform() -> str:
  """The platform the traced step compiles for: that of the mesh's devices under a mesh (a
  TPU topology's when `aot` compiles on a CPU host), else JAX's default backend. Kernels are
  chosen by it, not by the host that traces."""
  mesh = jax.sharding.get_abstract_mesh()
  return jax.default_backend() if mesh.empty else mesh.abstract_device.platform
