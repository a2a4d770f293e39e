"""A trained model back from its model_dir: the gin config it was trained with, its latest
parameters (no optimizer state) on the configured mesh, and its task's vocabulary."""

from __future__ import annotations

import os

import jax
import seqio
from flax import nnx

from pretrain_jax import config
from pretrain_jax.errors import UserError
from pretrain_jax.training import checkpoints, trainer


def load(model_dir: str):
  """Returns (model, vocabulary, step) for the gin config already parsed (config.configure)."""
  factory = config.bound("train.model")
  if factory is None:
    raise UserError("no train.model in the gin config: pass --gin_file, or a --model_dir that "
                    "holds the config.gin its training run wrote")
  model_dir = os.path.abspath(model_dir) if "://" not in model_dir else model_dir
  setup = trainer.Setup(factory, loss_fn=None, num_steps=1, seed=config.bound("train.seed", 0))
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), read_only=True)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise UserError(f"no checkpoint in {model_dir}/checkpoints: train first")
    abstract = setup.abstract_with_shardings().params
    with setup.context():
      restored, missing = ckpt.restore_params(abstract)
  finally:
    ckpt.close()
  if missing:
    raise UserError(f"the checkpoint in {model_dir} lacks {len(missing)} of this model's "
                    f"parameters (first: {missing[0]}); the gin config does not match it")
  leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  params = treedef.unflatten([restored["params/" + checkpoints.path_str(p)] for p, _ in leaves])
  return nnx.merge(setup.graphdef, params), task_vocabulary(), step


def task_vocabulary():
  """The vocabulary of train.task's "targets" feature (what the model was trained to read)."""
  task = config.bound("train.task")
  if task is None:
    raise UserError("no train.task in the gin config; the vocabulary comes from it")
  features = seqio.get_mixture_or_task(task).output_features
  return features["targets"].vocabulary if "targets" in features else (
      features[next(iter(features))].vocabulary)
