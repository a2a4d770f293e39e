"""`export`: a parameter-efficient run in its inference form, as a run directory of its own.

Prefix tuning trains its prefixes through an MLP (peft/prefix.py); inference needs only the
prefixes it computes. `export` writes OUT_DIR with those plain prefixes, a config.gin saying
so (`peft.Prefix.reparameterize = False`) and, for a delta run, a delta against the same base:
`eval`, `generate` and `icl` read it like any run. LoRA needs no export (loading merges it).
"""

from __future__ import annotations

import dataclasses
import os

import gin
import jax
import jax.numpy as jnp

from pretrain_jax import config
from pretrain_jax.errors import UserError
from pretrain_jax.peft import delta as delta_lib
from pretrain_jax.peft import prefix


def export(model_dir: str, out_dir: str) -> dict:
  """Writes OUT_DIR (which must not hold a checkpoint); returns what it stored."""
  from pretrain_jax.inference import loading  # pylint: disable=import-outside-toplevel
  from pretrain_jax.training import checkpoints, train_state, trainer  # pylint: disable=import-outside-toplevel
  model_dir, out_dir = os.path.abspath(model_dir), os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, "checkpoints")):
    raise UserError(f"export: {out_dir} already holds checkpoints; choose a new --out_dir")
  module, _, step = loading.load(model_dir, merge_lora=False)
  if not prefix.plain(module):
    raise UserError(f"export: {model_dir} has no reparameterised prefix, so its checkpoint "
                    "already is its inference form (LoRA merges when loaded)")
  with open(os.path.join(model_dir, "config.gin")) as f:
    config_text = f.read()
  gin.bind_parameter("peft.Prefix.reparameterize", False)
  num_steps = sum(n for n, _ in trainer._stages(  # pylint: disable=protected-access
      config.bound("train.sequence_length"), config.bound("train.num_steps"),
      config.bound("train.stages")))
  setup = trainer.Setup(config.bound("train.model"), config.bound("train.loss_fn"), num_steps,
                        seed=config.bound("train.seed", 0))
  fresh = setup.init_state()  # fresh optimizer moments, so the export also resumes
  _, params, _, model_state = train_state.split(module)
  state = train_state.TrainState(
      jnp.asarray(step, jnp.int32), jax.device_put(params, setup.shardings.params),
      fresh.opt_state, jax.device_put(model_state, setup.shardings.model_state))
  delta = delta_lib.Delta.read(model_dir)
  if delta is not None:  # the same base; the plain prefixes replace their reparameterisation
    stored = sorted(p for p in delta_lib.flat(params)
                    if p in delta.stored or p.endswith(("/prefix_keys", "/prefix_values")))
    delta = delta_lib.Delta(delta.base, delta.base_step, delta.fingerprint, tuple(stored))
    state = dataclasses.replace(state, params=delta.stored_params(state.params))
  os.makedirs(out_dir, exist_ok=True)
  ckpt = checkpoints.Checkpointer(os.path.join(out_dir, "checkpoints"))
  try:
    ckpt.save(step, state, {"stage": 0, "epoch": 0, "batch": 0})
    ckpt.wait()
  finally:
    ckpt.close()
  if delta is not None:
    delta.write(out_dir)
  with open(os.path.join(out_dir, "config.gin"), "w") as f:
    f.write(config_text + f"\n# pretrain-jax export of {model_dir}: the prefixes stored plain\n"
            "peft.Prefix.reparameterize = False\n")
  return {"out_dir": out_dir, "step": int(step), "stored_arrays": len(delta_lib.flat(state.params)),
          "stored_bytes": train_state.num_bytes(state.params)}
