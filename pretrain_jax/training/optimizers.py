"""Optimizers and schedules by gin: BERT's AdamW, LAMB, GPT-3's cosine, T5's Adafactor."""

import re
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
import optax

from pretrain_jax.errors import UserError
from pretrain_jax.training import checkpoints


@gin.configurable
def warmup_linear_decay(num_steps: int, learning_rate: float = 1e-4, warmup_steps: int = 10_000,
                        decay_steps: int | None = None) -> optax.Schedule:
  """BERT: linear warmup to the peak, then linear decay to zero at the end of training."""
  decay_steps = decay_steps or num_steps
  warmup_steps = min(warmup_steps, max(decay_steps - 1, 0))
  return optax.join_schedules(
      [optax.linear_schedule(0.0, learning_rate, warmup_steps),
       optax.linear_schedule(learning_rate, 0.0, max(decay_steps - warmup_steps, 1))],
      boundaries=[warmup_steps])


@gin.configurable
def warmup_cosine_decay(num_steps: int, learning_rate: float = 6e-4, warmup_steps: int = 2000,
                        final_fraction: float = 0.1) -> optax.Schedule:
  """GPT-3 (Brown et al. 2020): linear warmup, then cosine decay to 10 % of the peak."""
  warmup_steps = min(warmup_steps, max(num_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(num_steps, 1),
                                            end_value=learning_rate * final_fraction)


@gin.configurable
def rsqrt_decay(num_steps: int, learning_rate: float = 0.01,
                warmup_steps: int = 10_000) -> optax.Schedule:
  """T5: constant `learning_rate` for `warmup_steps`, then ∝ 1/√step (0.01 = 1/√10⁴)."""
  del num_steps
  return lambda step: learning_rate * jnp.sqrt(warmup_steps / jnp.maximum(step, warmup_steps))


@gin.configurable
def decay_mask(params, exclude: Sequence[str] = (r"bias$", r"norm/"),
               decay_embeddings: bool = True):
  """True where weight decay applies, by '/'-joined parameter path (re.search), not by rank: a
  scanned stack's biases are 2-D, and so are attention's per-head q/k/v biases. BERT excludes
  biases (`bias$` also catches `mlm_bias`) and LayerNorm parameters (every norm's path holds
  `norm/`); embedding tables (`embedding$`) are decayed unless `decay_embeddings=False`."""
  patterns = tuple(exclude) + (() if decay_embeddings else (r"embedding$",))
  return jax.tree_util.tree_map_with_path(
      lambda path, _: not any(re.search(p, checkpoints.path_str(path)) for p in patterns),
      params)


@gin.configurable
def make_optimizer(num_steps: int, name: str = "adamw", schedule=warmup_linear_decay,
                   weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-6, clip_norm: float | None = 1.0,
                   adafactor_decay: float = 0.8, adafactor_parameter_scale: bool = True):
  """Returns (optax transformation, schedule). Clipping by global norm comes first, as in BERT.

  `adafactor_parameter_scale`: Adafactor's step relative to each parameter's RMS (floored at
  1e-3), as T5 pretrains. A weight that starts at zero (LoRA's B, an adapter's up-projection,
  the prefix MLP's output) then moves at 1e-3 × the learning rate: turn it off to train those.
  """
  lr = schedule(num_steps)
  if name == "adamw":
    tx = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  elif name == "lamb":
    tx = optax.lamb(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask)
  elif name == "adafactor":  # T5: β₂ decay 0.8, no momentum, factored second moments
    tx = optax.adafactor(lr, decay_rate=adafactor_decay, momentum=None, factored=True,
                         multiply_by_parameter_scale=adafactor_parameter_scale)
  else:
    raise UserError(f"make_optimizer.name={name!r}; valid: 'adamw', 'lamb', 'adafactor'")
  if clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
  return tx, lr
