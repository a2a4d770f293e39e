"""Device mesh and logical-axis partitioning (what t5x called pjit).

Every parameter carries logical axis names (`('embed', 'mlp')`), set where the layer is
defined with `nnx.with_partitioning`. A gin-configurable rule table maps logical names to mesh
axes; `jax.jit` with the resulting `NamedSharding`s is pjit. Models never name mesh axes, so
one model runs on one CPU, on 8 fake devices, or on a pod by changing only the rules and mesh.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import gin
import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pretrain_jax.errors import UserError
from pretrain_jax.layers.sharding import activation_rules, constrain, logical_to_spec  # pylint: disable=unused-import

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")  # expert-parallel ranks hold different tokens too

# Logical axis -> mesh axis (or tuple of mesh axes, or None = replicated).
# Parameters: layers (the stacked axis of a scanned stack), vocab, embed, mlp, heads, kv,
# position, token_type, expert, q_lora and kv_lora (MLA's latents).
# Activations: batch, length, act_embed, act_mlp, act_heads, act_kv, act_vocab.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", BATCH_AXES),
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("q_lora", None),  # MLA's query and key/value latents (small: replicated)
    ("kv_lora", None),
    ("position", None),
    ("token_type", None),
    ("relpos_buckets", None),
    ("expert", "expert"),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_vocab", "tensor"),
)


@gin.configurable(denylist=["devices"])
def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, expert: int = 1,
              num_devices: int | None = None, devices: Sequence | None = None) -> Mesh:
  """A mesh with axes (data, fsdp, tensor, expert) over `devices` (default jax.devices(); any
  list, e.g. a TPU topology's devices for ahead-of-time compilation) or their first
  `num_devices`; one size may be -1, meaning the rest. A whole device list is laid out by its
  physical topology (jax.make_mesh), a prefix in the given order."""
  devices = list(jax.devices() if devices is None else devices)
  whole = True
  if num_devices is not None:
    if not 0 < num_devices <= len(devices):
      raise UserError(f"make_mesh.num_devices={num_devices}, but {len(devices)} devices exist")
    whole = num_devices == len(devices)
    devices = devices[:num_devices]
  sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "expert": expert}
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise UserError(f"mesh sizes {sizes}: each must be a positive integer, at most one -1 "
                    "(meaning: the remaining devices)")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if free:
    if len(devices) % fixed:
      raise UserError(f"mesh sizes {sizes}: the fixed axes multiply to {fixed}, which does not "
                      f"divide the {len(devices)} devices")
    sizes[free[0]] = len(devices) // fixed
  if math.prod(sizes.values()) != len(devices):
    raise UserError(f"mesh sizes {sizes} multiply to {math.prod(sizes.values())}, but there are "
                    f"{len(devices)} devices: make the product {len(devices)} (or set one "
                    "axis to -1)")
  shape = tuple(sizes[a] for a in MESH_AXES)
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if whole:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=axis_types)


@gin.configurable
def logical_axis_rules(rules=DEFAULT_RULES, overrides=()) -> dict:
  """The logical -> mesh table; `overrides` (pairs) replace single entries from gin."""
  table = dict(rules)
  table.update(dict(overrides))
  return table


@contextlib.contextmanager
def context(mesh: Mesh, rules: dict):
  """The mesh and the activation rules, active while tracing or placing arrays."""
  with jax.set_mesh(mesh), activation_rules(rules):
    yield


def tree_shardings(abstract_tree, mesh: Mesh, rules: dict):
  """NamedShardings for a tree of nnx Variables (params, optimizer moments, ...).

  Leaves carrying `out_sharding` metadata are sharded by their logical names; every other
  array (step counters, scalars) is replicated.
  """
  def one(path, x):
    names = x.get_metadata().get("out_sharding") if isinstance(x, nnx.Variable) else None
    if names and len(names) != len(x.shape):
      names = None  # a factored statistic (Adafactor's row/column second moments): replicate
    elif names:  # a length-1 axis (Adafactor's placeholder statistics) cannot be split
      names = tuple(None if size == 1 else n for n, size in zip(names, x.shape))
    spec = logical_to_spec(names, rules) if names else PartitionSpec()
    _check_divides(path, x.shape, spec, mesh)
    sharding = NamedSharding(mesh, spec)
    return x.replace(sharding) if isinstance(x, nnx.Variable) else sharding
  return jax.tree_util.tree_map_with_path(one, abstract_tree,
                                          is_leaf=lambda x: isinstance(x, nnx.Variable))


def _check_divides(path, shape, spec: PartitionSpec, mesh: Mesh) -> None:
  """One line naming the array, instead of XLA's IndivisibleError deep in jit."""
  for dim, (size, axes) in enumerate(zip(shape, spec)):
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = math.prod(mesh.shape[a] for a in axes)
    if size % ways:
      raise UserError(
          f"{jax.tree_util.keystr(path, simple=True, separator='/')} has shape {tuple(shape)}: "
          f"its axis {dim} of {size} does not split {ways} ways over mesh axis "
          f"{' x '.join(axes)} (mesh {dict(mesh.shape)}); use a mesh whose "
          f"{' x '.join(axes)} size divides {size}")


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Batches are split over data x fsdp x expert along their first dimension."""
  return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def describe(tree) -> str:
  """One line per array: path, global shape, spec and the shape of one device's shard."""
  lines = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if hasattr(x, "sharding") and hasattr(x, "addressable_shards"):
      spec = getattr(x.sharding, "spec", "")
      lines.append(f"{jax.tree_util.keystr(path):60s} {str(x.shape):18s} {str(spec):28s} "
                   f"shard {x.addressable_shards[0].data.shape}")
  return "\n".join(lines)
