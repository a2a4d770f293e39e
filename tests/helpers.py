"""Small helpers shared by the test files (pytest puts tests/ on sys.path)."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
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


def cached_logits(model, tokens_1L, prefill: int):
  """A decoder's logits for every position of one row, decoded through its cache: the first
  `prefill` tokens at once, then one token per call."""
  length = tokens_1L.shape[1]
  cache = model.init_cache(1, length)
  positions = jnp.arange(length)[None]
  logits, cache = model.decode(jnp.asarray(tokens_1L[:, :prefill]), positions[:, :prefill],
                               jnp.ones((1, prefill), bool), cache)
  steps = [np.asarray(logits)[0]]
  for i in range(prefill, length):
    logits, cache = model.decode(jnp.asarray(tokens_1L[:, i:i + 1]), positions[:, i:i + 1],
                                 jnp.ones((1, 1), bool), cache)
    steps.append(np.asarray(logits)[0])
  return np.concatenate(steps)


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
