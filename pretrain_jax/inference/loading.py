"""A trained model back from its model_dir: the gin config it was trained with, its latest
parameters and model state (no optimizer, none even built) on the configured mesh, and its
task's vocabulary."""

from __future__ import annotations

import os

import seqio

import gin

from pretrain_jax import config, peft
from pretrain_jax.errors import UserError
from pretrain_jax.peft import delta as delta_lib
from pretrain_jax.peft import lora
from pretrain_jax.training import checkpoints, partitioning, train_state


@gin.configurable(denylist=["model_dir"])
def load(model_dir: str, merge_lora: bool = True):
  """Returns (model, vocabulary, step) for the gin config already parsed (config.configure).

  A parameter-efficient run's model_dir is composed with its base (peft/delta.py); its LoRA
  updates are merged into their weights (`merge_lora`), which changes no output.
  """
  factory = config.bound("train.model")
  if factory is None:
    raise UserError("no train.model in the gin config: pass --gin_file, or a --model_dir that "
                    "holds the config.gin its training run wrote")
  model_dir = os.path.abspath(model_dir) if "://" not in model_dir else model_dir
  mesh, rules = partitioning.make_mesh(), partitioning.logical_axis_rules()
  model = train_state.AbstractModel.build(peft.finetune().wrap(factory),
                                          config.bound("train.seed", 0))
  delta = delta_lib.Delta.read(model_dir)
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), read_only=True)
  abstract = model.with_shardings(mesh, rules)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise UserError(f"no checkpoint in {model_dir}/checkpoints: train first")
    with partitioning.context(mesh, rules):
      restored, missing = ckpt.restore_by_path(abstract, context=f"loading {model_dir}")
      if delta is not None:
        stored = {p.removeprefix("params/"): x for p, x in delta_lib.flat(restored).items()
                  if p.startswith("params/")}
        restored["params"] = delta.compose(abstract["params"], stored, f"loading {model_dir}")
        missing = [p for p in missing if p.removeprefix("params/") in delta.stored
                   or not p.startswith("params/")]
  finally:
    ckpt.close()
  if missing:
    raise UserError(f"the checkpoint in {model_dir} lacks {len(missing)} of this model's "
                    f"arrays (first: {missing[0]}); the gin config does not match it")
  module = train_state.merge(model.graphdef, restored["params"],
                             train_state.zeros_like(model.aux), restored["model_state"])
  if merge_lora:
    lora.merge(module, skip_banks=True)
  return module, task_vocabulary(), step


def task_vocabulary():
  """The vocabulary of train.task's "targets" feature (what the model was trained to read)."""
  task = config.bound("train.task")
  if task is None:
    raise UserError("no train.task in the gin config; the vocabulary comes from it")
  features = seqio.get_mixture_or_task(task).output_features
  return features["targets"].vocabulary if "targets" in features else (
      features[next(iter(features))].vocabulary)
