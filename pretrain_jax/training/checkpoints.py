"""Orbax checkpoints of the train state plus the input pipeline's position."""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from pretrain_jax.errors import UserError


def _shapes_by_path(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))
  return {path_str(path): tuple(x.shape) for path, x in leaves}


def path_str(path) -> str:
  parts = []
  for key in path:
    k = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    if str(k) in ("value", "raw_value"):
      continue  # nnx.Variable wrappers and their saved dicts differ only here
    parts.append(str(k))
  return "/".join(parts)


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
                                             read_only=read_only, create=not read_only))

  def save(self, step: int, state, data_position: dict) -> bool:
    return self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_position)))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, abstract_state):
    """Restores the latest checkpoint onto the shardings in `abstract_state`, or None."""
    step = self.manager.latest_step()
    if step is None:
      return None
    self._check_compatible(step, abstract_state)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return restored["state"], restored["data"]

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

  def restore_params(self, abstract_params):
    """Initial weights from another run (finetuning): every parameter of `abstract_params`
    whose path exists in this directory's latest checkpoint is read onto its sharding.

    Returns (the restored arrays by path, the model's paths the checkpoint lacks). A path
    present in both with different shapes is an error.
    """
    step = self.manager.latest_step()
    if step is None:
      raise UserError(f"train.init_from: no checkpoint in {self.directory}")
    on_disk = self.manager.item_metadata(step)["state"]
    on_disk = getattr(on_disk, "tree", on_disk)
    wanted = {("params/" + path_str(path)): x for path, x in
              jax.tree_util.tree_leaves_with_path(abstract_params)}
    found = {}

    def select(tree, prefix):
      if isinstance(tree, dict):
        kept = {k: select(v, f"{prefix}/{k}" if prefix else str(k)) for k, v in tree.items()}
        return {k: v for k, v in kept.items() if v is not None} or None
      path = "/".join(p for p in prefix.split("/") if p not in ("value", "raw_value"))
      if path not in wanted:
        return None
      if tuple(tree.shape) != tuple(wanted[path].shape):
        raise UserError(f"train.init_from: '{path}' is {tuple(tree.shape)} in {self.directory} "
                        f"but {tuple(wanted[path].shape)} in this model; the two architectures "
                        "differ")
      found[prefix] = path
      return wanted[path]

    subset = select({"params": on_disk["params"]}, "")
    if subset is None:
      raise UserError(f"train.init_from: the checkpoint in {self.directory} shares no parameter "
                      "with this model")
    restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), subset)
    restored = ocp.PyTreeCheckpointer().restore(
        self.manager.directory / str(step) / "state",
        args=ocp.args.PyTreeRestore(subset, restore_args=restore_args, partial_restore=True))
    by_path = {}
    for path, x in jax.tree_util.tree_leaves_with_path(restored):
      by_path[found["/".join(str(getattr(k, "key", k)) for k in path)]] = x
    return by_path, sorted(set(wanted) - set(by_path))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
