"""The train state, and how a model splits into it without being materialised.

    nnx.Param          `params`, all of them (one checkpoint path per parameter); the freeze
                       filter (`trainable_params`) picks those that get gradients and moments
    AuxLoss, AuxMetric written by the forward pass and read right after it (`aux_terms`);
                       not state: every forward pass starts them from zeros
    any other Variable `model_state`: carried through the step, updated by the forward pass

Inference (inference/loading.py) and the `info` verb need the same split and shardings but no
optimizer, so they live here rather than in the trainer.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import gin
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pretrain_jax.errors import UserError
from pretrain_jax.layers.variables import AuxLoss, AuxMetric
from pretrain_jax.training import partitioning

AUX = (AuxLoss, AuxMetric)
MODEL_STATE = nnx.Not(nnx.Any(nnx.Param, *AUX))  # what `split` leaves to its last filter, `...`


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: nnx.State  # every nnx.Param, trainable or frozen
  opt_state: optax.OptState  # built on the trainable parameters only
  model_state: nnx.State  # non-gradient Variables (counters, router biases, scale history)


def path_of(nnx_path: Sequence[Any]) -> str:
  """'encoder/layers/block/attention/query/kernel': an nnx State path as patterns see it."""
  return "/".join(map(str, nnx_path))


def split(model: nnx.Module):
  """(graphdef, params, aux, model_state) of a module (concrete or abstract)."""
  return nnx.split(model, nnx.Param, AUX, ...)


def merge(graphdef, params, aux, model_state) -> nnx.Module:
  """The module back; fresh Variables (copy=True), so a forward pass traced at another level
  than the state's (inside grad, scan) may update them."""
  return nnx.merge(graphdef, params, aux, model_state, copy=True)


def zeros_like(abstract: nnx.State) -> nnx.State:
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)


@dataclasses.dataclass(frozen=True)
class AbstractModel:
  """A model factory's output as shapes only (nnx.eval_shape): no weights are materialised."""
  module: nnx.Module
  graphdef: Any
  params: nnx.State
  aux: nnx.State
  model_state: nnx.State

  @classmethod
  def build(cls, model_factory: Callable[[int], nnx.Module], seed: int) -> AbstractModel:
    module = nnx.eval_shape(lambda: model_factory(seed))
    return cls(module, *split(module))

  def with_shardings(self, mesh, rules):
    """{'params', 'model_state'} as ShapeDtypeStructs carrying their NamedShardings."""
    tree = {"params": self.params, "model_state": self.model_state}
    shardings = partitioning.tree_shardings(tree, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        tree, shardings)


@dataclasses.dataclass(frozen=True)
class FreezeFilter:
  """Trainable iff a `trainable` pattern and no `frozen` pattern matches the parameter's path."""
  trainable: tuple[str, ...]
  frozen: tuple[str, ...]

  def __call__(self, path: str) -> bool:
    return (any(re.search(p, path) for p in self.trainable)
            and not any(re.search(p, path) for p in self.frozen))

  def nnx_filter(self, nnx_path, _=None) -> bool:
    return self(path_of(nnx_path))

  def check(self, params: nnx.State) -> None:
    """UserError for a bad regex, a pattern that matches no parameter (a typo freezes or trains
    nothing silently otherwise) and a filter that leaves nothing to train."""
    paths = [path_of(p) for p, _ in nnx.to_flat_state(params)]
    for name, patterns in (("trainable", self.trainable), ("frozen", self.frozen)):
      for pattern in patterns:
        try:
          hit = any(re.search(pattern, p) for p in paths)
        except re.error as e:
          raise UserError(f"trainable_params.{name}: {pattern!r} is not a regular expression "
                          f"({e})") from None
        if not hit:
          raise UserError(f"trainable_params.{name}: {pattern!r} matches no parameter path "
                          f"(paths look like {paths[0]!r})")
    if not any(map(self, paths)):
      raise UserError(f"trainable_params: trainable={list(self.trainable)} minus "
                      f"frozen={list(self.frozen)} leaves no parameter to train")

  def partition(self, params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """(trainable, frozen) parameters; `nnx.merge_state` puts them back together."""
    return nnx.split_state(params, self.nnx_filter, ...)


@gin.configurable
def trainable_params(trainable: Sequence[str] = (".*",),
                     frozen: Sequence[str] = ()) -> FreezeFilter:
  """The freeze filter, by regexes (re.search) over '/'-joined parameter paths such as
  'encoder/layers/block/attention/query/kernel'. In a scanned stack one layer is a slice of a
  stacked array, so freezing goes by path, not by layer. Frozen parameters get no gradient and
  no optimizer moments and stay bitwise unchanged:
  `--gin.trainable_params.frozen="['^encoder/']"`.
  """
  as_tuple = lambda x: (x,) if isinstance(x, str) else tuple(x)
  return FreezeFilter(as_tuple(trainable), as_tuple(frozen))


def aux_terms(model: nnx.Module) -> tuple[jax.Array | None, dict]:
  """After a forward pass: the sum of every AuxLoss (each summed over a leading layers axis;
  None when the model declares none) and {'aux/<path>': (value, 1.0)} metrics for every AuxLoss
  and AuxMetric; an AuxMetric declared with `reduce='each'` (per-layer expert load) gives one
  metric per element instead, 'aux/<path>/<i>'."""
  total, metrics = None, {}
  for kind in AUX:
    for path, variable in nnx.to_flat_state(nnx.state(model, kind)):
      value = variable[...].astype(jnp.float32)
      name = f"aux/{path_of(path)}"
      if kind is AuxMetric and getattr(variable, "reduce", "sum") == "each" and value.ndim:
        metrics.update({f"{name}/{i}": (v, jnp.float32(1.0))
                        for i, v in enumerate(value.reshape(-1))})
        continue
      value = jnp.sum(value)
      metrics[name] = (value, jnp.float32(1.0))
      if kind is AuxLoss:
        total = value if total is None else total + value
  return total, metrics


def num_elements(tree) -> int:
  return sum(x.size for x in jax.tree.leaves(tree))


def num_bytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
