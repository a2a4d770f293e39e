"""Dense projections, embeddings and norms whose parameters carry logical axis names; every
matmul takes its `dot_general` from the precision policy (layers/precision.py)."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.layers.precision import dot_general, dot_general_for


def normal(stddev: float):
  return nnx.initializers.truncated_normal(stddev=stddev)


class Dense(nnx.LinearGeneral):
  """`nnx.LinearGeneral` with logical axes: `axes` names the kernel's (in..., out...) dims.

  Multi-dimensional in/out features keep heads as their own axis (`embed -> heads x kv`), so
  the tensor-parallel rule can split heads without reshapes. `role` picks the matmul from the
  precision policy; None keeps full precision whatever the policy (the MoE router, whose
  choices are discrete).
  """

  def __init__(self, in_features: int | Sequence[int], out_features: int | Sequence[int],
               axes: Sequence[str | None], *, role: str | None, use_bias: bool = True,
               init_std: float = 0.02, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    in_features = (in_features,) if isinstance(in_features, int) else tuple(in_features)
    out_features = (out_features,) if isinstance(out_features, int) else tuple(out_features)
    axes = tuple(axes)
    assert len(axes) == len(in_features) + len(out_features), (axes, in_features, out_features)
    super().__init__(
        in_features, out_features, axis=tuple(range(-len(in_features), 0)),
        use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(normal(init_std), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros, axes[len(in_features):]),
        dot_general=dot_general_for(role) if role else dot_general, rngs=rngs)

  def __call__(self, x: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
    """`rngs` (the layer's dropout stream, None when deterministic) is for subclasses that
    drop out (peft's LoRA); the projection itself is deterministic."""
    del rngs
    return super().__call__(x)


class Embed(nnx.Embed):
  """Token/position embedding table with logical axes (`vocab`|`position`, `embed`)."""

  def __init__(self, num_embeddings: int, features: int, axes=("vocab", "embed"), *,
               init_std: float = 0.02, dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(num_embeddings, features, dtype=dtype, param_dtype=param_dtype,
                     embedding_init=nnx.with_partitioning(normal(init_std), axes), rngs=rngs)
    self.head_dot_general = dot_general_for("head")

  def attend(self, query_BLD: jax.Array) -> jax.Array:
    """Logits against every row (a tied output head): query · Eᵀ through the head's matmul."""
    query_BLD, table_VD = self.promote_dtype((query_BLD, self.embedding[...]),
                                              dtype=self.dtype)
    return self.head_dot_general(query_BLD, table_VD, (((query_BLD.ndim - 1,), (1,)), ((), ())))


class LayerNorm(nnx.LayerNorm):
  """LayerNorm whose scale and bias follow the `embed` axis."""

  def __init__(self, features: int, *, epsilon: float = 1e-6, dtype=None,
               param_dtype=jnp.float32, rngs: nnx.Rngs):
    super().__init__(features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                     scale_init=nnx.with_partitioning(nnx.initializers.ones, ("embed",)),
                     bias_init=nnx.with_partitioning(nnx.initializers.zeros, ("embed",)),
                     rngs=rngs)


class RMSNorm(nnx.RMSNorm):
  """x / RMS(x) · g (Zhang & Sennrich 2019): no mean, no bias; the scale follows `axis`."""

  def __init__(self, features: int, *, epsilon: float = 1e-6, dtype=None,
               param_dtype=jnp.float32, axis: str = "embed", rngs: nnx.Rngs):
    super().__init__(features, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype,
                     scale_init=nnx.with_partitioning(nnx.initializers.ones, (axis,)),
                     rngs=rngs)
