"""Houlsby adapters (Houlsby et al. 2019): a bottleneck with a skip connection after the
attention output projection and after the feed-forward block of every layer.

    y = f(x)                        the frozen sublayer's output projection
    y + W_up act(W_down y + b) + b'  W_down [D, m], W_up [m, D], m ≪ D (64 in the paper)

Both projections start near zero (truncated normal, small std), so the adapted model starts
within float noise of the pretrained one. Adapters, every layer norm and the task head train.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import gin
import jax
from flax import nnx

from pretrain_jax import peft
from pretrain_jax.errors import UserError
from pretrain_jax.layers.linear import Dense


class AdaptedDense(Dense):
  """A `Dense` (same kernel and bias, same paths) followed by a bottleneck adapter."""

  def __init__(self, base: Dense, bottleneck: int, init_std: float, *, rngs: nnx.Rngs | None):
    peft.adopt(self, base)
    if len(base.out_features) != 1:
      raise UserError(f"peft.Adapters: an adapter follows a projection to the model width; "
                      f"this one writes {base.out_features}")
    width = base.out_features[0]
    lead = peft.leading_axes(base.kernel, len(base.in_features) + 1)
    normal = nnx.initializers.truncated_normal(init_std)
    zeros = nnx.initializers.zeros
    self.adapter_down_kernel = peft.new_param(rngs, normal, lead, (width, bottleneck),
                                              ("embed", None))
    self.adapter_down_bias = peft.new_param(rngs, zeros, lead, (bottleneck,), (None,))
    self.adapter_up_kernel = peft.new_param(rngs, normal, lead, (bottleneck, width),
                                            (None, "embed"))
    self.adapter_up_bias = peft.new_param(rngs, zeros, lead, (width,), ("embed",))

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    y_BLD = super().__call__(x)
    dtype = y_BLD.dtype
    h_BLM = jax.nn.gelu(y_BLD @ self.adapter_down_kernel[...].astype(dtype)
                        + self.adapter_down_bias[...].astype(dtype))
    return y_BLD + (h_BLM @ self.adapter_up_kernel[...].astype(dtype)
                    + self.adapter_up_bias[...].astype(dtype))


@gin.configurable(module="peft")
@dataclasses.dataclass(frozen=True)
class Adapters:
  """Adapters after every `Dense` whose path matches a `targets` regex: by default each
  layer's attention output projection and feed-forward output projection (BERT, GPT, T5)."""
  bottleneck: int = 64
  init_std: float = 1e-3  # the paper: 1e-2; smaller starts closer to the pretrained model
  targets: Sequence[str] = ("attention/out$", "mlp/wo$")
  train_layer_norms: bool = True

  def apply(self, module: nnx.Module, rngs: nnx.Rngs) -> None:
    if self.bottleneck < 1:
      raise UserError(f"peft.Adapters.bottleneck={self.bottleneck}; it must be >= 1")
    for path in peft.select(module, tuple(self.targets), Dense, "peft.Adapters"):
      base = peft.module_at(module, path)
      peft.replace(module, path, AdaptedDense(base, self.bottleneck, self.init_std, rngs=rngs))

  def trainable(self, module: nnx.Module) -> tuple[str, ...]:
    patterns = ["/adapter_(down|up)_(kernel|bias)$"]
    if self.train_layer_norms:
      norms = [path for path, m in peft.modules(module)
               if isinstance(m, (nnx.LayerNorm, nnx.RMSNorm))]
      patterns += [f"^{path}/" for path in norms]
    return tuple(patterns)
