"""Position-wise feed-forward blocks: plain (BERT, GPT) and gated (SwiGLU, GeGLU)."""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.layers.linear import Dense
from pretrain_jax.layers.sharding import constrain


class Mlp(nnx.Module):
  """W₂ · act(W₁ x + b₁) + b₂, the hidden width sharded along `mlp`."""

  def __init__(self, features: int, hidden: int, activation: Callable = jax.nn.gelu, *,
               use_bias: bool = True, init_std: float = 0.02, out_init_std: float | None = None,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    dense = dict(role="mlp", use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi = Dense(features, hidden, ("embed", "mlp"), init_std=init_std, **dense)
    self.wo = Dense(hidden, features, ("mlp", "embed"), init_std=out_init_std or init_std,
                    **dense)
    self.activation = activation

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    h_BLF = constrain(self.activation(self.wi(x_BLD)), ("batch", "length", "act_mlp"))
    return self.wo(h_BLF)


class GatedMlp(nnx.Module):
  """W₂ · (act(W_gate x) ⊙ W_up x) (Shazeer 2020): SwiGLU with silu, GeGLU with gelu."""

  def __init__(self, features: int, hidden: int, activation: Callable = jax.nn.silu, *,
               use_bias: bool = False, init_std: float = 0.02,
               out_init_std: float | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    dense = dict(role="mlp", use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.wi_gate = Dense(features, hidden, ("embed", "mlp"), init_std=init_std, **dense)
    self.wi_up = Dense(features, hidden, ("embed", "mlp"), init_std=init_std, **dense)
    self.wo = Dense(hidden, features, ("mlp", "embed"), init_std=out_init_std or init_std,
                    **dense)
    self.activation = activation

  def __call__(self, x_BLD: jax.Array) -> jax.Array:
    h_BLF = self.activation(self.wi_gate(x_BLD)) * self.wi_up(x_BLD)
    return self.wo(constrain(h_BLF, ("batch", "length", "act_mlp")))
