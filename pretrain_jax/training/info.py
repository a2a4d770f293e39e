"""The `info` verb: what a gin config would train, from shapes alone (nnx.eval_shape; no weight
is materialised, so a 100B-parameter config answers on a laptop)."""

from __future__ import annotations

import json
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax import config, peft
from pretrain_jax.data import pipeline
from pretrain_jax.errors import UserError
from pretrain_jax.models import protocol
from pretrain_jax.training import optimizers, train_state


@runtime_checkable
class _Sparse(Protocol):
  """A model that activates fewer parameters per token than it holds (mixture of experts)."""

  def activated_params(self) -> int: ...


def _training_only(params) -> int:
  """Parameters under an `mtp` path: multi-token-prediction modules, dropped at inference."""
  return sum(x.size for path, x in nnx.to_flat_state(params) if "mtp" in map(str, path))


def _sequence_length() -> int | None:
  stages = config.bound("train.stages")
  return config.bound("train.sequence_length") or (
      max(int(length) for _, length in stages) if stages else None)


def model_info() -> dict:
  """Counts for the gin config already parsed (config.configure); see `main` for the keys."""
  factory = config.bound("train.model")
  if factory is None:
    raise UserError("info: no train.model in the gin config; pass --gin_file=models/NAME.gin")
  finetune = peft.finetune()
  model = train_state.AbstractModel.build(finetune.wrap(factory), config.bound("train.seed", 0))
  freeze = finetune.freeze_filter(model.module, train_state.trainable_params())
  freeze.check(model.params)
  trainable, _ = freeze.partition(model.params)
  tx, _ = optimizers.make_optimizer(config.bound("train.num_steps") or 1)
  state = train_state.TrainState(jax.ShapeDtypeStruct((), jnp.int32), model.params,
                                 jax.eval_shape(tx.init, trainable), model.model_state)
  total = train_state.num_elements(model.params)
  length = _sequence_length()
  is_model = isinstance(model.module, protocol.Model)
  return {
      "model": type(model.module).__name__,
      "total_params": total,
      "trainable_params": train_state.num_elements(trainable),
      "trainable_fraction": train_state.num_elements(trainable) / total,
      "peft_methods": [type(m).__name__ for m in finetune.methods],
      "activated_params": (int(model.module.activated_params())
                           if isinstance(model.module, _Sparse) else total),
      "mtp_params": _training_only(model.params),
      "model_state_params": train_state.num_elements(model.model_state),
      "sequence_length": length,
      "flops_per_token": (float(model.module.train_flops_per_token(
          length, pipeline.decoder_length(length)))
                          if is_model and length else None),
      "params_bytes": train_state.num_bytes(model.params),
      "trainable_bytes": train_state.num_bytes(trainable),
      "optimizer_bytes": train_state.num_bytes(state.opt_state),
      "state_bytes": train_state.num_bytes(state),
  }


def table(info: dict) -> str:
  """A small aligned table for people: counts right-aligned, with thousands separators."""
  n = lambda x: "-" if x is None else f"{x:,.0f}"
  gib = lambda b: f"bytes  {b / 2**30:,.2f} GiB"
  flops = info["flops_per_token"]
  rows = [("total parameters", n(info["total_params"]), ""),
          ("trainable parameters", n(info["trainable_params"]),
           f"{info['trainable_fraction']:.2%}" + (
               f"  ({', '.join(info['peft_methods'])})" if info["peft_methods"] else "")),
          ("activated per token", n(info["activated_params"]), ""),
          ("of the total, MTP", n(info["mtp_params"]), "(training only)"),
          ("non-gradient state", n(info["model_state_params"]), ""),
          ("train FLOPs per token", n(flops),
           f"at L = {info['sequence_length']}" if flops else "(set train.sequence_length)"),
          ("parameters", n(info["params_bytes"]), gib(info["params_bytes"])),
          ("trainable (a delta)", n(info["trainable_bytes"]),
           f"bytes  {info['trainable_bytes'] / 2**20:,.2f} MiB"),
          ("optimizer state", n(info["optimizer_bytes"]), gib(info["optimizer_bytes"])),
          ("train state", n(info["state_bytes"]), gib(info["state_bytes"]))]
  label_w = max(len(r[0]) for r in rows)
  value_w = max(len(r[1]) for r in rows)
  lines = [f"{info['model']}"]
  lines += [f"  {a:<{label_w}}  {b:>{value_w}}  {c}".rstrip() for a, b, c in rows]
  return "\n".join(lines)


def main(as_json: bool = False) -> None:
  """Prints `model_info()`: JSON keys total_params, trainable_params (after the freeze filter
  and the peft methods), trainable_fraction, peft_methods, trainable_bytes (what a delta
  checkpoint stores of the parameters),
  activated_params (per token, by the model's own count: DeepSeek's excludes the looked-up
  embedding table; = total for dense models), mtp_params (multi-token-prediction modules,
  included in the total, dropped at inference), model_state_params (non-gradient
  state), flops_per_token (train FLOPs at train.sequence_length, the model's own count),
  params_bytes, optimizer_bytes and state_bytes (params + optimizer state + model state)."""
  info = model_info()
  print(json.dumps(info) if as_json else table(info))
