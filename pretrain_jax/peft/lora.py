"""LoRA (Hu et al. 2021): a frozen projection W plus a trained low-rank update.

    h = x W + (α / r) · dropout(x) A B        A [in, r] random, B [r, out] zero at init

so the model starts exactly as the pretrained one. After training, W + (α/r)·A B is one
matrix again (`merge`): inference costs nothing extra. With `bank_size` > 1 each batch row
reads its own (A, B) (peft.bank_index), and merging is impossible.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax import peft
from pretrain_jax.errors import UserError
from pretrain_jax.layers.attention import MultiHeadAttention
from pretrain_jax.layers.linear import Dense


class LoraDense(Dense):
  """A `Dense` (same kernel and bias, same paths) with a low-rank update beside it."""

  def __init__(self, base: Dense, rank: int, alpha: float, dropout_rate: float,
               bank_size: int, *, rngs: nnx.Rngs | None):
    peft.adopt(self, base)
    fan_in, fan_out = math.prod(base.in_features), math.prod(base.out_features)
    lead = peft.leading_axes(base.kernel, len(base.in_features) + len(base.out_features))
    bank = (bank_size,) if bank_size > 1 else ()
    bank_axes = (None,) * len(bank)
    # A as nn.Linear's default init (Kaiming-uniform with a = √5: U(±1/√in)), as the paper's code
    bound = fan_in ** -0.5
    uniform = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound)
    self.lora_a = peft.new_param(rngs, uniform, lead, (*bank, fan_in, rank),
                                 (*bank_axes, None, None))
    self.lora_b = peft.new_param(rngs, nnx.initializers.zeros, lead, (*bank, rank, fan_out),
                                 (*bank_axes, None, None))
    self.lora_scale = alpha / rank
    self.lora_dropout = nnx.Dropout(dropout_rate)
    self.merged = False
    self.is_bank = bank_size > 1

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    y = super().__call__(x)  # the base projection
    if self.merged:
      return y
    n_in = len(self.in_features)
    x_BN = x.reshape(*x.shape[:x.ndim - n_in], -1)  # [..., in]
    x_BN = self.lora_dropout(x_BN, rngs=rngs, deterministic=rngs is None)
    a, b = self.lora_a[...], self.lora_b[...]
    dtype = y.dtype
    if self.is_bank:  # a bank: row b of the batch uses entry bank_index[b]
      a_BIR, b_BRO = peft.gather_bank(a, x.shape[0]), peft.gather_bank(b, x.shape[0])
      flat = x_BN.reshape(x.shape[0], -1, x_BN.shape[-1])
      delta = jnp.einsum("bti,bir,bro->bto", flat.astype(dtype), a_BIR.astype(dtype),
                         b_BRO.astype(dtype))
    else:
      delta = (x_BN.astype(dtype) @ a.astype(dtype)) @ b.astype(dtype)
    return y + (self.lora_scale * delta).reshape(y.shape).astype(dtype)

  def merge(self) -> None:
    """W ← W + (α/r)·A B in place (stacked layers too); the update path is then skipped."""
    if self.is_bank:
      raise UserError("a LoRA bank (bank_size > 1) cannot be merged into one weight")
    delta = jnp.einsum("...ir,...ro->...io", self.lora_a[...], self.lora_b[...])
    self.kernel[...] = self.kernel[...] + (self.lora_scale * delta).reshape(self.kernel.shape)
    self.merged = True


@gin.configurable(module="peft")
@dataclasses.dataclass(frozen=True)
class Lora:
  """LoRA on every `Dense` whose path matches a `targets` regex (default: the attention
  query and value projections, the paper's GLUE setting)."""
  rank: int = 8
  alpha: float = 8.0
  dropout_rate: float = 0.0
  targets: Sequence[str] = ("attention/(query|value)$",)
  bank_size: int = 1

  def apply(self, module: nnx.Module, rngs: nnx.Rngs) -> None:
    if self.rank < 1 or self.bank_size < 1:
      raise UserError(f"peft.Lora: rank={self.rank} and bank_size={self.bank_size} must be >= 1")
    for path in peft.select(module, tuple(self.targets), Dense, "peft.Lora"):
      base = peft.module_at(module, path)
      parent = peft.module_at(module, path.rpartition("/")[0])
      if self.dropout_rate and not isinstance(parent, MultiHeadAttention):
        raise UserError(f"peft.Lora.dropout_rate={self.dropout_rate} needs the layer's dropout "
                        f"stream, which only attention projections receive; {path} is not "
                        "one: set dropout_rate=0 or target attention projections only")
      if isinstance(base, LoraDense):
        raise UserError(f"peft.Lora: {path} already has LoRA (two Lora methods target it)")
      peft.replace(module, path, LoraDense(base, self.rank, self.alpha, self.dropout_rate,
                                           self.bank_size, rngs=rngs))

  def trainable(self, module: nnx.Module) -> tuple[str, ...]:
    del module
    return ("/lora_[ab]$",)


def merge(module: nnx.Module, skip_banks: bool = False) -> int:
  """Merges every LoRA update into its weight (inference); returns how many. A bank cannot
  be merged: `skip_banks` leaves banks as they are instead of refusing."""
  merged = 0
  for _, m in peft.modules(module):
    if isinstance(m, LoraDense) and not m.merged:
      if m.is_bank and skip_banks:
        continue
      m.merge()
      merged += 1
  return merged
