"""Orbax checkpoints of the train state plus the input pipeline's position."""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from pretrain_jax.errors import UserError


def _shapes_by_path(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, dict))
  return {_path_str(path): tuple(x.shape) for path, x in leaves}


def _path_str(path) -> str:
  parts = []
  for key in path:
    k = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
    if str(k) in ("value", "raw_value"):
      continue  # nnx.Variable wrappers and their saved dicts differ only here
    parts.append(str(k))
  return "/".join(parts)


class Checkpointer:
  """Saves asynchronously when asked, keeps the last `keep`, restores the latest."""

  def __init__(self, directory: str, keep: int = 3):
    self.directory = directory
    self.manager = ocp.CheckpointManager(
        directory,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True))

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

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
