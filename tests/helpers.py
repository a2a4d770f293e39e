"""Small helpers shared by the test files (pytest puts tests/ on sys.path)."""

import gin
import jax
from flax import nnx

from pretrain_jax.config import configure
from pretrain_jax.training import metrics as metrics_lib, trainer


def perturbed(model: nnx.Module, seed: int) -> nnx.Module:
  """The model with 0.1 · N(0, 1) added to every parameter, so biases and norm scales are
  non-trivial and a reference comparison exercises them."""
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def param_count(model: nnx.Module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def train(model_dir, gin_files, bindings) -> list[dict]:
  """A fresh gin config, one in-process training run, its metrics.jsonl records."""
  gin.clear_config()
  configure(gin_files, bindings)
  trainer.train(str(model_dir), progress=False)
  return metrics_lib.read(str(model_dir))


def losses(records, split="train"):
  return [r["loss"] for r in records if r["split"] == split]
