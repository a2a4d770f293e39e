"""FP8 matmuls in DeepSeek-V3's recipe (V3 report §3.3), as a `dot_general` for the precision
policy: `include 'precision/fp8.gin'` turns it on for every attention and feed-forward
projection and every expert.

    activations  1 × 128 tiles along K       e4m3, one f32 scale per tile: amax / 448
    weights      128 × 128 blocks (K × M)    e4m3, one f32 scale per block
    product      Σ_c  (q_x,c · q_w,c) · s_x,c · s_w,c   over 128-wide K chunks c, in f32

Scaling per tile rather than per tensor keeps one outlier from flushing its neighbours to
zero; summing each 128-chunk in f32 is the report's promotion to higher precision (N_C = 128).
Parameters stay f32 (the master weights); the backward pass multiplies the cotangent with the
dequantised operands in the compute dtype (the report quantises Dgrad/Wgrad too; we keep
them exact). The residuals saved for it are the e4m3 operands and their scales, so
activations are stored in one byte.

Two ways to compute the same product: 'chunked' contracts each K chunk with float8 operands
and f32 accumulation, a batched dot that XLA:GPU can hand to fp8 GEMMs; 'dequantized'
multiplies the dequantised operands in f32, which equals it up to f32 summation order and is
what a CPU without fp8 units runs fast. None picks 'dequantized' on CPU, 'chunked' elsewhere.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import gin
import jax
import jax.numpy as jnp

from pretrain_jax.errors import UserError
from pretrain_jax.layers.sharding import target_platform

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3fn; casting past it gives NaN, so values are clipped
TILE = 128
IMPLEMENTATIONS = (None, "chunked", "dequantized")


def _pad_to(x, axis: int, multiple: int):
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths)


def _to_e4m3(t, scale):
  return jnp.clip(t / scale, -E4M3_MAX, E4M3_MAX).astype(E4M3)


def _scale_of(amax):
  return jnp.where(amax > 0, amax / E4M3_MAX, 1.0)


def quantize_rows(x_NK: jax.Array):
  """x [..., N, K] → (q [..., N, C, 128] e4m3, scale [..., N, C] f32), C = ceil(K / 128);
  K is zero-padded (zeros change neither the scales nor the product)."""
  t = _pad_to(x_NK.astype(jnp.float32), -1, TILE)
  t = t.reshape(*t.shape[:-1], -1, TILE)
  scale = _scale_of(jnp.max(jnp.abs(t), axis=-1))
  return _to_e4m3(t, scale[..., None]), scale


def quantize_blocks(w_KM: jax.Array):
  """w [..., K, M] → (q [..., C, 128, Mb, 128] e4m3, scale [..., C, Mb] f32), zero-padded."""
  t = _pad_to(_pad_to(w_KM.astype(jnp.float32), -2, TILE), -1, TILE)
  *lead, k, m = t.shape
  t = t.reshape(*lead, k // TILE, TILE, m // TILE, TILE)
  scale = _scale_of(jnp.max(jnp.abs(t), axis=(-3, -1)))
  return _to_e4m3(t, scale[..., :, None, :, None]), scale


def dequantize_rows(q, scale, k: int):
  x = q.astype(jnp.float32) * scale[..., None]
  return x.reshape(*x.shape[:-2], -1)[..., :k]


def dequantize_blocks(q, scale, k: int, m: int):
  w = q.astype(jnp.float32) * scale[..., :, None, :, None]
  *lead, c, t, mb, _ = w.shape
  return w.reshape(*lead, c * t, mb * TILE)[..., :k, :m]


def _product(qx, sx, qw, sw, m: int, implementation: str):
  """Σ_c (q_x,c · q_w,c) s_x,c s_w,c for x [B, N, K], w [B, K, M] → [B, N, M] f32."""
  if implementation == "dequantized":
    x = dequantize_rows(qx, sx, qx.shape[-2] * TILE)
    w = dequantize_blocks(qw, sw, qw.shape[-4] * TILE, qw.shape[-2] * TILE)
    y = jnp.einsum("bnk,bkm->bnm", x, w, precision=jax.lax.Precision.HIGHEST)
    return y[..., :m]
  b, c, _, mb, _ = qw.shape
  qw_BCTM = qw.reshape(b, c, TILE, mb * TILE)
  part_BCNM = jnp.einsum("bnct,bctm->bcnm", qx, qw_BCTM, preferred_element_type=jnp.float32)
  sw_BCM = jnp.repeat(sw, TILE, axis=-1)
  y = jnp.einsum("bcnm,bnc,bcm->bnm", part_BCNM, sx, sw_BCM)
  return y[..., :m]


def fp8_batched_matmul(x_BNK, w_BKM, implementation: str):
  """x [B, N, K] · w [B, K, M] through e4m3 tiles and blocks → [B, N, M] f32."""
  static = (implementation, *w_BKM.shape[-2:], jnp.dtype(x_BNK.dtype), jnp.dtype(w_BKM.dtype))
  return _fp8_matmul(static, x_BNK, w_BKM)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fp8_matmul(static, x_BNK, w_BKM):
  return _forward(static, x_BNK, w_BKM)[0]


def _forward(static, x_BNK, w_BKM):
  implementation, _, m, _, _ = static
  qx, sx = quantize_rows(x_BNK)
  qw, sw = quantize_blocks(w_BKM)
  return _product(qx, sx, qw, sw, m, implementation), (qx, sx, qw, sw)


def _backward(static, residuals, g_BNM):
  _, k, m, x_dtype, w_dtype = static
  qx, sx, qw, sw = residuals
  compute = jnp.result_type(x_dtype, w_dtype)
  x = dequantize_rows(qx, sx, k).astype(compute)
  w = dequantize_blocks(qw, sw, k, m).astype(compute)
  g = g_BNM.astype(compute)
  d_x = jnp.einsum("bnm,bkm->bnk", g, w)
  d_w = jnp.einsum("bnk,bnm->bkm", x, g)
  return d_x.astype(x_dtype), d_w.astype(w_dtype)


_fp8_matmul.defvjp(_forward, _backward)


@gin.configurable(module="fp8")
@dataclasses.dataclass(frozen=True)
class Fp8DotGeneral:
  """`jax.lax.dot_general`'s signature through FP8 tiles; any dimension numbers: operands
  are transposed to [batch, free, contracting] · [batch, contracting, free] and reshaped to
  one K and one M, so a multi-axis kernel (heads × head dim) is quantised as one K × M matrix.
  """
  implementation: str | None = None

  def __post_init__(self):
    if self.implementation not in IMPLEMENTATIONS:
      raise UserError(f"fp8.Fp8DotGeneral.implementation={self.implementation!r}; valid: "
                      f"{IMPLEMENTATIONS}")

  def _resolved(self) -> str:
    if self.implementation is not None:
      return self.implementation
    return "dequantized" if target_platform() == "cpu" else "chunked"

  def __call__(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
               out_sharding=None):
    del precision  # the e4m3 tiles set the precision
    if out_sharding is not None:
      raise UserError("fp8.Fp8DotGeneral does not take out_sharding; constrain the result")
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    lhs_c, rhs_c, lhs_b, rhs_b = map(tuple, (lhs_c, rhs_c, lhs_b, rhs_b))
    lhs_f = tuple(d for d in range(lhs.ndim) if d not in lhs_c + lhs_b)
    rhs_f = tuple(d for d in range(rhs.ndim) if d not in rhs_c + rhs_b)
    batch = tuple(lhs.shape[d] for d in lhs_b)
    lhs_free = tuple(lhs.shape[d] for d in lhs_f)
    rhs_free = tuple(rhs.shape[d] for d in rhs_f)
    k = math.prod(lhs.shape[d] for d in lhs_c)
    x_BNK = jnp.transpose(lhs, lhs_b + lhs_f + lhs_c).reshape(
        math.prod(batch), math.prod(lhs_free), k)
    w_BKM = jnp.transpose(rhs, rhs_b + rhs_c + rhs_f).reshape(
        math.prod(batch), k, math.prod(rhs_free))
    y = fp8_batched_matmul(x_BNK, w_BKM, self._resolved())
    out_dtype = preferred_element_type or jnp.result_type(lhs, rhs)
    return y.reshape(batch + lhs_free + rhs_free).astype(out_dtype)

  def ragged_dot(self, x_NK, w_EKM, group_sizes_E):
    """`jax.lax.ragged_dot` on fp8-quantised operands (rows per 1 × 128 tile, each expert's
    weights per 128 × 128 block), dequantised for the grouped kernel, which has no fp8 form;
    gradients pass straight through the rounding."""
    k, m = w_EKM.shape[-2:]
    qx, sx = quantize_rows(x_NK)
    qw, sw = quantize_blocks(w_EKM)
    x = _straight_through(x_NK, dequantize_rows(qx, sx, k))
    w = _straight_through(w_EKM, dequantize_blocks(qw, sw, k, m))
    return jax.lax.ragged_dot(x, w, group_sizes_E)


def _straight_through(exact, rounded):
  return exact + jax.lax.stop_gradient(rounded.astype(exact.dtype) - exact)
