"""Position-wise feed-forward block."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.layers.linear import Dense
from pretrain_jax.training.partitioning import constrain


class Mlp(nnx.Module):
  """W₂ · act(W₁ x + b₁) + b₂, the hidden width sharded along `mlp`."""

  def __init__(self, features: int, hidden: int, activation: Callable = jax.nn.gelu, *,
               use_bias: bool = True, init_std: float = 0.02, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    dense = dict(use_bias=use_bias, init_std=init_std, dtype=dtype, param_dtype=param_dtype,
                 rngs=rngs)
    self.wi = Dense(features, hidden, ("embed", "mlp"), **dense)
    self.wo = Dense(hidden, features, ("mlp", "embed"), **dense)
    self.activation = activation

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    h_BLF = constrain(self.activation(self.wi(x_BLD)), ("batch", "length", "act_mlp"))
    return self.wo(h_BLF)
