"""Delta checkpoints: a parameter-efficient run stores only what it trained.

    MODEL_DIR/delta.json     {"base": the run it started from (train.init_from, absolute),
                              "base_step": that run's step, "fingerprint": of the base
                              parameters it kept frozen, "stored": the parameter paths its own
                              checkpoints hold}
    MODEL_DIR/checkpoints    the train state with `params` cut to the stored paths (the
                             trained ones, plus frozen ones the base lacks)

Loading (resume, `eval`, `generate`, `icl`) reads the stored parameters from the run and the
rest from the base, and refuses a base that is missing or whose frozen parameters no longer
have the fingerprint (retrained, or another model at the same path).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.errors import UserError

FILE = "delta.json"


def flat(tree) -> dict[str, object]:
  """{'encoder/layers/block/attention/query/kernel': leaf} of a params State (or any tree)."""
  from pretrain_jax.training.checkpoints import path_str  # pylint: disable=import-outside-toplevel
  return {path_str(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def rebuild(like, by_path: dict[str, object]):
  """A tree shaped like `like` whose leaves are `by_path[path]`."""
  from pretrain_jax.training.checkpoints import path_str  # pylint: disable=import-outside-toplevel
  leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
  return treedef.unflatten([by_path[path_str(path)] for path, _ in leaves])


def subset(params: nnx.State, paths) -> nnx.State:
  """The parameters at `paths` (an nnx.State again: orbax saves it like the whole)."""
  keep = set(paths)
  return nnx.filter_state(params, lambda path, _: "/".join(map(str, path)) in keep)


def _checksum(x: jax.Array) -> jax.Array:
  """A position-weighted sum of the array's bits (uint32, wrapping): any change of a value
  or of its place changes it; computed where the array lives, so no host gathers it."""
  bits = (jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
          if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.uint32))
  weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
  return jnp.sum(bits.reshape(-1) * weights, dtype=jnp.uint32)


def fingerprint(params) -> str:
  """sha256 over (path, checksum) of every array: identifies the exact weights a delta was
  trained on (not a cryptographic hash of the bytes: a cheap, sharding-friendly one)."""
  by_path = flat(params)
  paths = sorted(by_path)
  sums = jax.jit(lambda xs: [_checksum(x) for x in xs])([by_path[p] for p in paths])
  digest = hashlib.sha256()
  for path, s in zip(paths, jax.device_get(sums)):
    digest.update(path.encode() + b"\0" + int(s).to_bytes(4, "little"))
  return digest.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Delta:
  base: str
  base_step: int
  fingerprint: str
  stored: tuple[str, ...]

  @classmethod
  def read(cls, model_dir: str) -> Delta | None:
    path = os.path.join(model_dir, FILE)
    if not os.path.exists(path):
      return None
    with open(path) as f:
      d = json.load(f)
    return cls(d["base"], int(d["base_step"]), d["fingerprint"], tuple(d["stored"]))

  def write(self, model_dir: str) -> None:
    if jax.process_index() == 0:
      with open(os.path.join(model_dir, FILE), "w") as f:
        json.dump({**dataclasses.asdict(self), "stored": list(self.stored)}, f, indent=1)

  def stored_params(self, params: nnx.State) -> nnx.State:
    return subset(params, self.stored)

  def compose(self, abstract_params: nnx.State, stored: dict[str, jax.Array],
              context: str) -> nnx.State:
    """Every parameter of `abstract_params` (ShapeDtypeStructs with shardings): the stored
    ones from `stored` (by path), the rest from the base, checked against the fingerprint."""
    from pretrain_jax.training import checkpoints  # pylint: disable=import-outside-toplevel
    base_dir = os.path.join(self.base, "checkpoints")
    if "://" not in base_dir and not os.path.isdir(base_dir):
      raise UserError(f"{context}: its base run {self.base} is missing (the delta holds only "
                      f"{len(self.stored)} trained arrays); restore the base there, or edit "
                      f"'base' in its {FILE}")
    wanted = flat(abstract_params)
    frozen = {p: x for p, x in wanted.items() if p not in self.stored}
    source = checkpoints.Checkpointer(base_dir, read_only=True)
    try:
      restored, missing = source.restore_by_path(
          {"params": _dict_tree(frozen)}, context=f"{context}: its base {self.base}")
    finally:
      source.close()
    if missing:
      raise UserError(f"{context}: its base {self.base} lacks {missing[0]} (and "
                      f"{len(missing) - 1} more): not the run this delta was trained from")
    from_base = {p.removeprefix("params/"): x for p, x in flat(restored).items()}
    found = fingerprint(_dict_tree(from_base))
    if found != self.fingerprint:
      raise UserError(f"{context}: its base {self.base} has other weights than the delta was "
                      f"trained on (fingerprint {found}, expected {self.fingerprint}); point "
                      f"'base' in its {FILE} at the original run")
    return rebuild(abstract_params, {**from_base, **{p: stored[p] for p in self.stored}})


def clear(model_dir: str) -> None:
  """Removes a delta.json left by an earlier attempt at this run (returns None)."""
  path = os.path.join(model_dir, FILE)
  if jax.process_index() == 0 and os.path.exists(path):
    os.remove(path)


def _dict_tree(by_path: dict[str, object]) -> dict:
  """{'a/b/c': x} → {'a': {'b': {'c': x}}}: the nested dict orbax and path_str agree on."""
  tree: dict = {}
  for path, x in by_path.items():
    *parents, name = path.split("/")
    node = tree
    for part in parents:
      node = node.setdefault(part, {})
    node[name] = x
  return tree


def create(base: str, base_step: int, frozen_from_base: dict[str, jax.Array],
           stored: list[str]) -> Delta:
  return Delta(base, base_step, fingerprint(_dict_tree(frozen_from_base)), tuple(sorted(stored)))
