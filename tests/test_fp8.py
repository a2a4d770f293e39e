"""FP8 in DeepSeek-V3's recipe: e4m3 rounding bounds per tile and block, the matmul against
float64, both implementations one answer, the precision policy's switch, and a run that trains."""

import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from pretrain_jax.config import configure
from pretrain_jax.errors import UserError
from pretrain_jax.layers import fp8, moe, precision

# e4m3: 3 mantissa bits, so a normal value rounds within 2^-4 of itself; below the smallest
# normal (2^-6 in scaled units) the spacing is 2^-9, so the error is at most 2^-10 · scale.
REL, SUBNORMAL = 2.0**-4, 2.0**-10
F32_SLACK = 2.0**-20


def _wide_range(rng, shape):
  """Magnitudes log-uniform over 2^-14 … 2^6 with random signs: normals, subnormals and
  values flushed to zero all occur within one tile."""
  return (rng.choice([-1.0, 1.0], shape) * 2.0**rng.uniform(-14, 6, shape)).astype(np.float32)


def _bound(x, scale_per_element):
  return np.maximum(np.abs(x) * REL, scale_per_element * SUBNORMAL) + np.abs(x) * F32_SLACK


def test_activation_tiles_round_within_e4m3_bounds_and_an_outlier_only_scales_its_tile():
  rng = np.random.default_rng(0)
  x = _wide_range(rng, (256, 300))  # K = 300: two full tiles and a zero-padded third
  x[3, :128] = 0.0  # an all-zero tile
  x[5, 7] = 1e4  # an outlier in tile (5, 0)
  q, scale = fp8.quantize_rows(jnp.asarray(x))
  assert q.dtype == jnp.float8_e4m3fn and q.shape == (256, 3, 128) and scale.shape == (256, 3)
  got = np.asarray(fp8.dequantize_rows(q, scale, 300))
  per_element = np.repeat(np.asarray(scale), 128, axis=1)[:, :300]
  err = np.abs(got - x)
  assert (err <= _bound(x, per_element)).all(), float((err / _bound(x, per_element)).max())
  assert (err / _bound(x, per_element)).max() > 0.5  # the bound is tight: real e4m3 rounding
  tiles = np.abs(np.pad(x, ((0, 0), (0, 84))).reshape(256, 3, 128)).max(-1)
  np.testing.assert_allclose(scale, np.where(tiles > 0, tiles / 448.0, 1.0), rtol=3e-7)
  assert (got[3, :128] == 0).all() and scale[3, 0] == 1.0
  np.testing.assert_allclose(got[5, 7], 1e4, rtol=1e-6)  # each tile's amax is exact (448)
  # Per tile: the outlier coarsens row 5's first tile only; its second tile keeps its detail.
  q_clean, _ = fp8.quantize_rows(jnp.asarray(np.where(np.arange(300) == 7, 0.0, x[5])))
  np.testing.assert_array_equal(np.asarray(q[5, 1:], np.float32),
                                np.asarray(q_clean[1:], np.float32))


def test_weight_blocks_round_within_e4m3_bounds_per_128_by_128_block():
  rng = np.random.default_rng(1)
  w = _wide_range(rng, (2, 200, 300))  # a batch of kernels, K and M both padded
  q, scale = fp8.quantize_blocks(jnp.asarray(w))
  assert q.shape == (2, 2, 128, 3, 128) and scale.shape == (2, 2, 3)
  got = np.asarray(fp8.dequantize_blocks(q, scale, 200, 300))
  per_element = np.repeat(np.repeat(np.asarray(scale), 128, 1), 128, 2)[:, :200, :300]
  err = np.abs(got - w)
  assert (err <= _bound(w, per_element)).all()
  blocks = np.abs(np.pad(w, ((0, 0), (0, 56), (0, 84))).reshape(2, 2, 128, 3, 128)).max((2, 4))
  np.testing.assert_allclose(scale, blocks / 448.0, rtol=3e-7)


@pytest.mark.parametrize("implementation", ["dequantized", "chunked"])
def test_fp8_matmul_is_within_the_rounding_bound_of_float64(implementation):
  """|y − y₆₄| ≤ |x|·e_w + e_x·|w| + e_x·e_w elementwise, with e the per-element rounding
  bounds; the relative error is e4m3's (a few %), not f32's."""
  rng = np.random.default_rng(2)
  x = rng.standard_normal((96, 300)).astype(np.float32)
  x[:, 130] *= 50.0  # an outlier channel, as activations have
  w = (rng.standard_normal((300, 200)) * 0.05).astype(np.float32)
  dot = fp8.Fp8DotGeneral(implementation)
  y = np.asarray(dot(jnp.asarray(x), jnp.asarray(w), (((1,), (0,)), ((), ()))), np.float64)
  y64 = x.astype(np.float64) @ w.astype(np.float64)
  _, sx = fp8.quantize_rows(jnp.asarray(x))
  _, sw = fp8.quantize_blocks(jnp.asarray(w))
  e_x = _bound(x, np.repeat(np.asarray(sx), 128, 1)[:, :300])
  e_w = _bound(w, np.repeat(np.repeat(np.asarray(sw), 128, 0), 128, 1)[:300, :200])
  bound = np.abs(x) @ e_w + e_x @ np.abs(w) + e_x @ e_w + 1e-5 * (np.abs(x) @ np.abs(w))
  assert (np.abs(y - y64) <= bound).all()
  relative = np.linalg.norm(y - y64) / np.linalg.norm(y64)
  assert 0.005 < relative < 0.06, relative


def test_chunked_fp8_operands_equal_the_dequantized_product_and_any_dimension_numbers():
  """The float8 dot per 128-chunk (what an fp8 GEMM runs) equals dequantise-then-multiply up
  to f32 summation order, for a heads × head-dim kernel, its output projection, and a batch."""
  rng = np.random.default_rng(3)
  cases = [((4, 10, 256), (256, 4, 48), (((2,), (0,)), ((), ()))),  # x_BLD · W_DHK
           ((4, 10, 4, 48), (4, 48, 256), (((2, 3), (0, 1)), ((), ()))),  # x_BLHK · W_HKD
           ((3, 16, 64), (3, 64, 40), (((2,), (1,)), ((0,), (0,)))),  # per-expert blocks
           ((8, 256), (200, 256), (((1,), (1,)), ((), ())))]  # x · Eᵀ (a tied table)
  for lhs_shape, rhs_shape, dims in cases:
    lhs = jnp.asarray(rng.standard_normal(lhs_shape), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal(rhs_shape) * 0.05, jnp.float32)
    chunked = fp8.Fp8DotGeneral("chunked")(lhs, rhs, dims)
    dequantized = fp8.Fp8DotGeneral("dequantized")(lhs, rhs, dims)
    exact = jax.lax.dot_general(lhs, rhs, dims, precision=jax.lax.Precision.HIGHEST)
    assert chunked.shape == exact.shape
    np.testing.assert_allclose(chunked, dequantized, rtol=1e-5, atol=1e-6)
    relative = float(jnp.linalg.norm(chunked - exact) / jnp.linalg.norm(exact))
    assert 0.005 < relative < 0.06, (lhs_shape, rhs_shape, relative)
  # What a GPU's compiler is handed: a dot of float8 operands accumulating in f32.
  lowered = jax.jit(lambda x, w: fp8.Fp8DotGeneral("chunked")(x, w, cases[0][2])).lower(
      jnp.ones(cases[0][0]), jnp.ones(cases[0][1])).as_text()
  assert re.search(r"dot_general .*\(tensor<[0-9x]+xf8E4M3FN>, tensor<[0-9x]+xf8E4M3FN>\) "
                   r"-> tensor<[0-9x]+xf32>", lowered)


def test_backward_multiplies_the_cotangent_by_the_dequantized_operands():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_normal((2, 24, 200)), jnp.bfloat16)
  w = jnp.asarray(rng.standard_normal((200, 72)) * 0.05, jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 24, 72)), jnp.float32)
  dims = (((2,), (0,)), ((), ()))
  y, vjp = jax.vjp(lambda x, w: fp8.Fp8DotGeneral()(x, w, dims), x, w)
  assert y.dtype == jnp.float32  # result_type(bf16, f32)
  d_x, d_w = vjp(g)
  assert d_x.dtype == jnp.bfloat16 and d_w.dtype == jnp.float32
  qx, sx = fp8.quantize_rows(x.reshape(48, 200))
  qw, sw = fp8.quantize_blocks(w)
  x_q = np.asarray(fp8.dequantize_rows(qx, sx, 200), np.float64)
  w_q = np.asarray(fp8.dequantize_blocks(qw, sw, 200, 72), np.float64)
  g64 = np.asarray(g, np.float64).reshape(48, 72)
  np.testing.assert_allclose(np.asarray(d_x, np.float64).reshape(48, 200), g64 @ w_q.T,
                             rtol=2e-2, atol=2e-2)  # d_x is bf16
  np.testing.assert_allclose(d_w, x_q.T @ g64, rtol=1e-4, atol=1e-4)


def test_fp8_gin_switch_quantises_projections_and_experts_but_not_the_router_or_head():
  gin.clear_config()
  configure(["precision/fp8.gin"], [])
  assert isinstance(precision.dot_general_for("attention"), fp8.Fp8DotGeneral)
  assert isinstance(precision.dot_general_for("mlp"), fp8.Fp8DotGeneral)
  head = precision.dot_general_for("head")  # gin's wrapper of precision.dot_general
  assert getattr(head, "__wrapped__", head) is precision.dot_general
  cfg = moe.MoeConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_dim=48)
  x = jax.random.normal(jax.random.key(0), (2, 40, 160))
  outputs, routes = {}, {}
  for name, implementation in [("fp8_blocks", "blocks"), ("fp8_ragged", "ragged_dot"),
                               ("fp32", "blocks")]:
    gin.clear_config()
    configure([] if name == "fp32" else ["precision/fp8.gin"],
              [f"grouped_swiglu.implementation = '{implementation}'"])
    layer = moe.MoeMlp(160, cfg, rngs=nnx.Rngs(0))
    outputs[name] = layer(x)
    routes[name] = moe.route(jax.nn.sigmoid(layer.router(x.reshape(-1, 160))),
                             layer.bias[...], cfg)[0]
  gin.clear_config()
  # The router's matmul is full precision under FP8: every token picks the same experts.
  np.testing.assert_array_equal(routes["fp8_blocks"], routes["fp32"])
  # Expert blocks (quantised after the gather) and ragged_dot (quantised per expert) agree.
  np.testing.assert_allclose(outputs["fp8_blocks"], outputs["fp8_ragged"], rtol=1e-4,
                             atol=1e-6)
  relative = float(jnp.linalg.norm(outputs["fp8_blocks"] - outputs["fp32"])
                   / jnp.linalg.norm(outputs["fp32"]))
  assert 0.005 < relative < 0.08, relative


def test_bad_fp8_implementation_is_refused():
  with pytest.raises(UserError, match="implementation='fp16'.*valid"):
    fp8.Fp8DotGeneral("fp16")


def test_tiny_deepseek_trains_in_fp8(tmp_path):
  records = helpers.train(tmp_path, ["experiments/deepseek_tiny_cpu.gin", "precision/fp8.gin"], [
      "train.num_steps = 30", "train.batch_size = 8", "train.sequence_length = 64",
      "train.log_every = 10", "train.eval_every = 0", "train.checkpoint_every = 100",
      "DeepSeekConfig.num_layers = 2", "DeepSeekConfig.hidden = 128",
      "DeepSeekConfig.dense_mlp_dim = 256", "MoeConfig.expert_dim = 32",
      "DeepSeekConfig.max_positions = 64", "warmup_cosine_decay.warmup_steps = 5"])
  gin.clear_config()
  train = [r for r in records if r["split"] == "train"]
  assert all(np.isfinite(r["loss"]) for r in train)
  assert train[-1]["perplexity"] < 0.5 * train[0]["perplexity"], [r["loss"] for r in train]
