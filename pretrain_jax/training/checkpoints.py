"""Orbax checkpoints of the train state plus the input pipeline's position."""

from __future__ import annotations

import dataclasses
import os
import sys

import jax
import orbax.checkpoint as ocp

from pretrain_jax.errors import UserError


def _shapes_by_path(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))
  return {path_str(path): tuple(x.shape) for path, x in leaves}


def path_str(path) -> str:
  """'encoder/layers/block/attention/value/kernel' for a leaf's path in memory or on disk."""
  parts = [str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key))))
           for key in path]
  return "/".join(_unwrapped(parts))


def _unwrapped(parts: list[str]) -> list[str]:
  """Without the trailing key an nnx.Variable (in memory) or its saved dict (on disk) adds:
  only the last one, as a module may own a projection named `value` (attention's)."""
  return parts[:-1] if parts and parts[-1] in ("value", "raw_value") else parts


class Checkpointer:
  """Saves asynchronously when asked, keeps the last `keep`, restores the latest."""

  def __init__(self, directory: str, keep: int = 3, read_only: bool = False):
    """`read_only`: a run we only read from (init_from, eval, generate) must exist and is
    never created or modified."""
    self.directory = directory
    if read_only and "://" not in directory and not os.path.isdir(directory):
      raise UserError(f"{directory}: no such directory (expected a training run's checkpoints)")
    self.manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             read_only=read_only, create=not read_only,
                                             cleanup_tmp_directories=not read_only))
    self.read_only = read_only

  def save(self, step: int, state, data_position: dict) -> bool:
    return self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state):
    """Restores the newest intact checkpoint onto the shardings in `abstract_state` (a
    dataclass such as TrainState), or None when there is none.

    A damaged one (a missing item, truncated metadata: the host died while writing it) is
    moved aside to STEP.damaged, with a warning, and the one before it is tried. A checkpoint
    of another architecture is refused, not skipped."""
    damaged = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self._restore(step, abstract_state)
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        damaged.append(self._set_aside(step, e))
    if damaged:
      raise UserError(f"every checkpoint in {self.directory} is damaged ({', '.join(damaged)}); "
                      "nothing to resume from: use a fresh --model_dir")
    return None

  def _set_aside(self, step: int, error: Exception) -> str:
    where = os.path.join(self.directory, str(step))
    if not self.read_only and jax.process_index() == 0:
      # A step set aside before, rewritten by the resumed run, can be damaged again.
      target, n = where + ".damaged", 1
      while os.path.exists(target):
        target, n = f"{where}.damaged.{n}", n + 1
      os.rename(where, target)
      where = target
      self.manager.reload()
    reason = (str(error).strip().splitlines() or [""])[0][:200]
    print(f"warning: checkpoint {step} in {self.directory} is damaged "
          f"({type(error).__name__}: {reason}); kept as {where}, trying the one before",
          file=sys.stderr, flush=True)
    return str(step)

  def _restore(self, step: int, abstract_state):
    saved = self.manager.item_metadata(step).get("state")
    if saved is None:  # orbax gives None for an item it cannot find
      raise FileNotFoundError(f"step {step} has no state item")
    self._check_compatible(step, abstract_state)
    saved = getattr(saved, "tree", saved)
    fields = {f.name: getattr(abstract_state, f.name) for f in dataclasses.fields(abstract_state)}
    absent = {k: v for k, v in fields.items() if k not in saved and not jax.tree.leaves(v)}
    target = ({k: v for k, v in fields.items() if k not in absent} if absent else
              abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
    state = restored["state"]
    if absent:
      state = dataclasses.replace(abstract_state, **state, **absent)
    return state, restored["data"]

  def _check_compatible(self, step: int, abstract_state) -> None:
    saved = _shapes_by_path(self.manager.item_metadata(step)["state"])
    wanted = _shapes_by_path(abstract_state)
    for path in sorted(set(saved) | set(wanted), key=lambda p: (not p.startswith("params"), p)):
      if saved.get(path) != wanted.get(path):
        have = saved.get(path, "nothing")
        want = wanted.get(path, "nothing")
        raise UserError(
            f"{self.directory} holds a checkpoint (step {step}) of another architecture: "
            f"'{path}' is {have} there but {want} in this model; use a fresh --model_dir or "
            "the gin config it was trained with")

  def restore_by_path(self, abstract: dict, fallback=None, context: str = "train.init_from"):
    """Every leaf of `abstract` (a dict of trees, ShapeDtypeStructs with shardings: {'params':
    ..., 'model_state': ...}) whose path exists in this directory's latest checkpoint, read onto
    its sharding (orbax partial restore: the optimizer state is never read).

    Returns (a tree like `abstract` holding the restored arrays and, where the checkpoint lacks
    a path, `fallback`'s leaf (None without one); the sorted paths it lacks). A path present in
    both with different shapes is an error. `context` opens the error messages.
    """
    step = self.manager.latest_step()
    if step is None:
      raise UserError(f"{context}: no checkpoint in {self.directory}")
    on_disk = self.manager.item_metadata(step)["state"]
    on_disk = getattr(on_disk, "tree", on_disk)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    wanted = {path_str(path): x for path, x in leaves}
    found = {}

    def select(tree, prefix):
      if isinstance(tree, dict):
        kept = {k: select(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None} or None
      path = "/".join(_unwrapped(prefix.split("/")))
      if path not in wanted:
        return None
      if tuple(tree.shape) != tuple(wanted[path].shape):
        raise UserError(f"{context}: '{path}' is {tuple(tree.shape)} in {self.directory} "
                        f"but {tuple(wanted[path].shape)} in this model; the two architectures "
                        "differ")
      found[prefix] = path
      return wanted[path]

    subset = select({k: on_disk[k] for k in abstract if k in on_disk}, "")
    if subset is None:
      raise UserError(f"{context}: the checkpoint in {self.directory} shares no parameter "
                      "with this model")
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), subset)
    restored = ocp.PyTreeCheckpointer().restore(
        self.manager.directory / str(step) / "state",
        args=ocp.args.PyTreeRestore(subset, restore_args=restore_args, partial_restore=True))
    by_path = {found["/".join(str(getattr(k, "key", k)) for k in path)]: x
               for path, x in jax.tree_util.tree_leaves_with_path(restored)}
    defaults = ([None] * len(leaves) if fallback is None else
                treedef.flatten_up_to(fallback))
    tree = treedef.unflatten([by_path.get(path_str(path), default)
                              for (path, _), default in zip(leaves, defaults)])
    return tree, sorted(set(wanted) - set(by_path))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
