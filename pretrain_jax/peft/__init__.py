"""Parameter-efficient finetuning: new weights grafted onto a built model, the rest frozen.

    peft.finetune.methods = [@peft.Lora()]        (gin_configs/peft/*.gin)

`finetune().wrap(factory)` returns the model factory with each method's surgery done after the model is
built: the pretrained parameters keep their paths (so `train.init_from` and delta checkpoints
find them) and the method adds its own (`lora_a`, `adapter_down`, `prefix_keys`, ...). Surgery
works on scanned stacks too: a layer's module inside a `Stack` holds arrays with a leading
`layers` axis, and the grafted parameters get the same axis.

A bank (`bank_size` > 1) holds several tuned copies of a method's weights; a batch with a
'bank_index' feature runs row b with entry bank_index[b] (`bank_index`, `gather_bank`).

`finetune().freeze_filter(module, default)` is what trains: each method's new parameters, the method's
extras (Houlsby's layer norms) and the model's new task head (`finetuning_head`, e.g.
'^classifier/'); everything else is frozen (no gradient, no optimizer state).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Callable, Iterator, Sequence

import gin
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.errors import UserError


def modules(root: nnx.Module) -> Iterator[tuple[str, nnx.Module]]:
  """('encoder/layers/block/attention/query', module) for every submodule, parents first."""
  for path, node in nnx.iter_graph(root):
    if isinstance(node, nnx.Module) and path:
      yield "/".join(map(str, path)), node


def module_at(root: nnx.Module, path: str) -> nnx.Module:
  for part in path.split("/") if path else ():
    root = getattr(root, part)
  return root


def replace(root: nnx.Module, path: str, new: nnx.Module) -> None:
  """Puts `new` where the module at `path` is, and wherever else that same module is held
  (T5's shared encoder-decoder hands the encoder's attention to the decoder)."""
  old = module_at(root, path)
  holders = [root] + [m for _, m in modules(root)]
  for holder in holders:
    for name, value in list(vars(holder).items()):
      if value is old and not name.startswith("_"):
        setattr(holder, name, new)


def select(root: nnx.Module, patterns: Sequence[str], kind: type, method: str) -> list[str]:
  """Paths of the `kind` submodules matching any pattern (re.search); a pattern matching none
  is a UserError that lists the names that exist."""
  candidates = [path for path, m in modules(root) if isinstance(m, kind)]
  chosen = [p for p in candidates if any(re.search(pattern, p) for pattern in patterns)]
  for pattern in patterns:
    if not any(re.search(pattern, p) for p in candidates):
      names = sorted({re.sub(r"^.*?/layers/block/", "", p) for p in candidates})
      raise UserError(f"{method}.targets: {pattern!r} matches no {kind.__name__}; they are: "
                      f"{', '.join(names)}")
  return chosen


def leading_axes(variable: nnx.Variable, inner_ndim: int) -> tuple[tuple[int, ...], tuple]:
  """(shape, logical names) of a parameter's axes before its own `inner_ndim` ones: the
  `layers` axis of a scanned stack (empty outside one)."""
  lead = variable.shape[:variable.ndim - inner_ndim]
  names = tuple(variable.get_metadata().get("out_sharding") or (None,) * variable.ndim)
  return lead, names[:len(lead)]


def new_param(rngs: nnx.Rngs | None, init, lead: tuple[tuple, tuple], shape: Sequence[int],
              axes: Sequence[str | None]) -> nnx.Param:
  """A parameter of `shape` behind the `lead` axes, initialised by `init(key, shape)`."""
  lead_shape, lead_names = lead
  full = (*lead_shape, *shape)
  key = rngs.params() if rngs is not None else None
  value = init(key, full, jnp.float32)
  return nnx.Param(value, out_sharding=(*lead_names, *axes))


def adopt(new: nnx.Module, base: nnx.Module) -> None:
  """`new` takes over `base`'s attributes (its Variables included, at the same names): a
  subclass instance that computes more with the same pretrained parameters."""
  for name, value in vars(base).items():
    if not name.startswith("_"):
      setattr(new, name, value)


_BANK_INDEX = contextvars.ContextVar("peft_bank_index", default=None)


@contextlib.contextmanager
def bank_index(index_B):
  """Inside: every bank (prefixes, LoRA weights) uses entry index_B[b] for batch row b, so
  each row runs its own tuned model. The trainer enters it when a batch has 'bank_index'."""
  token = _BANK_INDEX.set(index_B)
  try:
    yield
  finally:
    _BANK_INDEX.reset(token)


def gather_bank(bank_N, batch: int):
  """bank_N[index_B] (rows [B, ...]) inside `bank_index`; entry 0 for every row outside."""
  index_B = _BANK_INDEX.get()
  if index_B is None:
    return jnp.broadcast_to(bank_N[0], (batch, *bank_N.shape[1:]))
  return jnp.take(bank_N, index_B, axis=0)


@dataclasses.dataclass(frozen=True)
class Finetune:
  """The configured methods (none: full finetuning, every parameter trains)."""
  methods: tuple = ()

  def wrap(self, model_factory: Callable[[int], nnx.Module]) -> Callable[[int], nnx.Module]:
    """`model_factory` with each method's surgery applied after the model is built (seeded
    by the same seed); the factory itself without a method."""
    if not self.methods:
      return model_factory

    def factory(seed: int) -> nnx.Module:
      module = model_factory(seed)
      rngs = nnx.Rngs(params=seed + 7919)  # the grafted weights' own stream
      for method in self.methods:
        method.apply(module, rngs)
      return module
    return factory

  def freeze_filter(self, module: nnx.Module, default):
    """`default` (trainable_params) without a method; with one, only the methods' parameters
    and the model's new task head train (`default.frozen` still applies)."""
    if not self.methods:
      return default
    from pretrain_jax.training.train_state import FreezeFilter  # pylint: disable=import-outside-toplevel
    patterns = [p for m in self.methods for p in m.trainable(module)]
    patterns += list(getattr(module, "finetuning_head", ()))
    return FreezeFilter(tuple(patterns), default.frozen)


@gin.configurable(module="peft")
def finetune(methods: Sequence = ()) -> Finetune:
  """`peft.finetune.methods = [@peft.Lora()]`: what gin_configs/peft/*.gin bind."""
  return Finetune(tuple(methods))
