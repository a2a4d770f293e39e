"""Layers on their own: the attention kernel against NumPy, its masks, the scanned stack
against its unrolled loop, and the precision policy reaching every projection."""

import collections

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretrain_jax.errors import UserError
from pretrain_jax.layers import attention, precision
from pretrain_jax.layers.stack import REMAT_POLICIES
from pretrain_jax.models import bert, gpt, t5
from pretrain_jax.training import partitioning, trainer


def _reference_attention(q, k, v, mask, bias, scale):
  """Per head, in float64: softmax(scale · q kᵀ + bias, masked) v; head h reads kv head h // R."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  batch, length, heads, _ = q.shape
  group = heads // k.shape[2]
  out = np.zeros((batch, length, heads, v.shape[-1]))
  for b in range(batch):
    for h in range(heads):
      scores = scale * q[b, :, h] @ k[b, :, h // group].T + bias[0, h]
      scores = np.where(mask[b, 0], scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      out[b, :, h] = (probs / probs.sum(-1, keepdims=True)) @ v[b, :, h // group]
  return out


def test_kernel_matches_numpy_with_grouped_heads_bias_mask_and_unequal_head_sizes():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 5, 6, 8)).astype(np.float32)  # H = 6 query heads
  k = rng.normal(size=(2, 7, 3, 8)).astype(np.float32)  # G = 3 kv heads, K = 8
  v = rng.normal(size=(2, 7, 3, 4)).astype(np.float32)  # V = 4 ≠ K (as MLA)
  bias = rng.normal(size=(1, 6, 5, 7)).astype(np.float32)
  mask = rng.random((2, 1, 5, 7)) < 0.7
  mask[..., 0] = True  # every query sees at least one key
  out = attention.dot_product_attention(q, k, v, mask, bias, scale=0.3)
  assert out.shape == (2, 5, 6, 4)
  np.testing.assert_allclose(out, _reference_attention(q, k, v, mask, bias, 0.3), rtol=1e-5,
                             atol=1e-5)
  # the pass-through to jax.nn.dot_product_attention computes the same (equal head sizes)
  v8 = np.concatenate([v, v], -1)
  np.testing.assert_allclose(
      attention.dot_product_attention(q, k, v8, mask, bias, implementation="xla"),
      attention.dot_product_attention(q, k, v8, mask, bias), rtol=1e-5, atol=1e-5)
  with pytest.raises(UserError, match="implementation='xla' has no attention dropout"):
    attention.dot_product_attention(q, k, v, mask, implementation="xla")  # K ≠ V
  with pytest.raises(UserError, match="implementation='flash'; valid"):
    attention.dot_product_attention(q, k, v8, mask, implementation="flash")


def _splash_case(causal: bool):
  """GQA (4 query heads, 2 kv heads) on 2 rows of 128 (the kernel's tile): packed documents
  and padding (causal, GPT), or one document and padding (BERT's padding mask)."""
  rng = np.random.default_rng(3)
  q, k, v = (rng.normal(size=(2, 128, h, 16)).astype(np.float32) for h in (4, 2, 2))
  segments = np.array([[1] * 50 + [2] * 60 + [0] * 18, [1] * 128])
  mask = (attention.SegmentMask(segments, segments, causal=True) if causal
          else attention.SegmentMask(np.where(segments != 0, 1, 0)))
  return q, k, v, mask, segments != 0


@pytest.mark.parametrize("causal", [True, False])
def test_splash_attention_matches_the_kernel_in_values_and_gradients(causal):
  """The TPU splash kernel, run by the Pallas interpreter on CPU, against float64 numpy and
  (gradients) the spelled-out kernel, at every real query; then the same under a data 2 ×
  tensor 2 mesh, where it runs in shard_map over batch and heads."""
  q, k, v, mask, valid_BL = _splash_case(causal)
  out = attention.dot_product_attention(q, k, v, mask, implementation="splash")
  with np.errstate(invalid="ignore"):  # padding queries read no key: NaN rows, not compared
    want = _reference_attention(q, k, v, np.asarray(mask.dense()), np.zeros((1, 4, 128, 128)),
                                16 ** -0.5)
  np.testing.assert_allclose(np.asarray(out)[valid_BL], want[valid_BL], rtol=1e-5, atol=1e-5)

  weights = np.random.default_rng(4).normal(size=(2, 128, 4, 16)) * valid_BL[:, :, None, None]

  def loss(impl):
    return lambda q, k, v: jnp.sum(
        attention.dot_product_attention(q, k, v, mask, implementation=impl) * weights)

  grads = jax.grad(loss("splash"), argnums=(0, 1, 2))(q, k, v)
  for got, ref in zip(grads, jax.grad(loss(None), argnums=(0, 1, 2))(q, k, v)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)

  mesh = partitioning.make_mesh(data=2, tensor=2, num_devices=4)
  with partitioning.context(mesh, partitioning.logical_axis_rules()):
    sharded = jax.jit(jax.grad(loss("splash"), argnums=(0, 1, 2)))(q, k, v)
    assert "shard_map" in str(jax.make_jaxpr(loss("splash"))(q, k, v))
  for got, ref in zip(sharded, grads):
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_splash_attention_refuses_what_it_cannot_compute():
  q, k, v, mask, _ = _splash_case(True)
  for kwargs in (dict(mask_B1LS=mask.dense()), dict(mask_B1LS=mask, dropout_rate=0.1,
                                                    dropout_key=jax.random.key(0)),
                 dict(mask_B1LS=mask, bias_BHLS=np.zeros((1, 4, 128, 128), np.float32))):
    with pytest.raises(UserError, match="implementation='splash' takes self-attention masked "
                                        "by segments"):
      attention.dot_product_attention(q, k, v, implementation="splash", **kwargs)
  with pytest.raises(UserError, match="lengths 64 and 64 are not multiples of 128"):
    attention.dot_product_attention(q[:, :64], k[:, :64], v[:, :64],
                                    attention.SegmentMask(mask.kv_segments_BS[:, :64]),
                                    implementation="splash")


@pytest.mark.parametrize("impl", ["threefry2x32", "rbg"])
def test_kernel_dropout_drops_probabilities_at_the_rate_and_keeps_the_mean(impl):
  """Whichever PRNG the trainer's `dropout_key` draws from (rbg: XLA's RngBitGenerator)."""
  rng = np.random.default_rng(1)
  q = rng.normal(size=(1, 64, 2, 4)).astype(np.float32)
  k = rng.normal(size=(1, 64, 2, 4)).astype(np.float32)
  v = np.eye(64, dtype=np.float32)[None, :, None, :].repeat(2, axis=2)  # out = probabilities
  probs = attention.dot_product_attention(q, k, v)
  outs = np.stack([attention.dot_product_attention(q, k, v, dropout_rate=0.25,
                                                   dropout_key=trainer.dropout_key(s, impl))
                   for s in range(40)])
  dropped = (outs == 0).mean()
  n = outs.size
  assert abs(dropped - 0.25) < 4.5 * np.sqrt(0.25 * 0.75 / n), dropped
  kept = outs[outs != 0] / np.broadcast_to(probs, outs.shape)[outs != 0]
  np.testing.assert_allclose(kept, 1 / 0.75, rtol=1e-5)  # inverted dropout: scaled survivors


def test_masks():
  segments = jnp.array([[1, 1, 2, 2, 0]])
  causal = np.asarray(attention.causal_mask(segments))[0, 0]
  np.testing.assert_array_equal(causal, [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                         [0, 0, 1, 1, 0], [0, 0, 0, 0, 0]])
  prefix = jnp.array([[1, 1, 0, 0, 0]]) > 0  # a one-document prefix LM row, prefix of 2
  np.testing.assert_array_equal(
      np.asarray(attention.prefix_mask(jnp.array([[1, 1, 1, 1, 0]]), prefix))[0, 0],
      [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 0]])
  cross = np.asarray(attention.cross_mask(jnp.array([[1, 2, 2]]), jnp.array([[1, 1, 2, 0]])))
  np.testing.assert_array_equal(cross[0, 0], [[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 0]])


def _bert(**kw):
  gin.clear_config()
  return bert.BertForPretraining(bert.BertConfig(vocab_size=100, hidden=32, num_layers=3,
                                                 num_heads=2, mlp_dim=64, **kw),
                                 rngs=nnx.Rngs(0))


@pytest.mark.parametrize("scan,unroll,policy", [
    (True, 1, "none"), (True, 1, "nothing_saveable"), (True, 1, "dots_saveable"),
    (True, 2, "none"), (True, True, "nothing_saveable"), (False, 1, "nothing_saveable")])
def test_scanned_stack_equals_the_loop_with_every_remat_policy(scan, unroll, policy):
  """Same parameters, same dropout keys: the loss and every gradient agree with the Python
  loop's, un-rematerialised, whatever the scan's unroll (2 of 3 layers: a remainder layer)."""
  ids = jnp.arange(16).reshape(2, 8) % 100

  def value_and_grads(model):
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p):
      h = nnx.merge(graphdef, p).encode(ids, ids * 0, rngs=nnx.Rngs(dropout=1))
      return (h ** 2).mean()
    return jax.jit(jax.value_and_grad(loss))(params)

  reference = value_and_grads(_bert(scan_layers=False))
  value, grads = value_and_grads(_bert(scan_layers=scan, scan_unroll=unroll,
                                       remat_policy=policy))
  np.testing.assert_allclose(value, reference[0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(reference[1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  assert policy in REMAT_POLICIES


def test_unknown_prng_is_refused():
  with pytest.raises(UserError, match="dropout_key.impl='philox'; valid: .*'rbg'"):
    trainer.dropout_key(0, "philox")


def test_unknown_remat_policy_and_bad_unroll_are_refused():
  with pytest.raises(UserError, match="BertConfig.remat_policy='dots'; valid: .*'dots_saveable'"):
    bert.BertConfig(remat_policy="dots")
  with pytest.raises(UserError, match=r"BertConfig.scan_unroll=0; valid: an int >= 1 .* or True"):
    bert.BertConfig(scan_unroll=0)


def _recorded_matmuls(build, run):
  """{role: number of dot_general calls} while tracing `run(build())`."""
  calls = collections.Counter()

  def recorder(role):
    def dot_general(*args, **kwargs):
      calls[role] += 1
      return jax.lax.dot_general(*args, **kwargs)
    return dot_general

  gin.clear_config()
  gin.bind_parameter("dot_general_for.overrides",
                     {role: recorder(role) for role in ("attention", "mlp", "head")})
  try:
    model = build()
  finally:
    gin.clear_config()
  jax.eval_shape(lambda: run(model))
  return dict(calls)


@pytest.mark.parametrize("scan", [False, True])
def test_the_precision_policy_reaches_every_projection(scan):
  """Per layer: BERT q, k, v, o + 2 MLP; GPT (SwiGLU) q, k, v, o + 3; T5 encoder 4 + 2, decoder
  4 + 4 cross + 2. A scanned stack traces its layer once, an unrolled one L times."""
  layers = 3
  per = lambda n: n * (1 if scan else layers)
  ids = jnp.ones((2, 8), jnp.int32)

  def bert_run(m):
    h = m.encode(ids, ids * 0)
    return m.mlm_logits(h[:, :2]), m.nsp_logits(h)
  counted = _recorded_matmuls(
      lambda: bert.BertForPretraining(bert.BertConfig(
          vocab_size=50, hidden=16, num_layers=layers, num_heads=2, mlp_dim=32,
          scan_layers=scan), rngs=nnx.Rngs(0)), bert_run)
  # heads: MLM transform + tied output (attend), pooler + NSP
  assert counted == {"attention": per(4), "mlp": per(2), "head": 4}

  counted = _recorded_matmuls(
      lambda: gpt.Gpt(gpt.GptConfig(vocab_size=50, hidden=16, num_layers=layers, num_heads=2,
                                    num_kv_heads=1, mlp_dim=32, mlp="swiglu", norm="pre_rmsnorm",
                                    positions="rope", tie_embeddings=False, scan_layers=scan),
                      rngs=nnx.Rngs(0)), lambda m: m(ids))
  assert counted == {"attention": per(4), "mlp": per(3), "head": 1}

  batch = {"encoder_input_tokens": ids, "decoder_input_tokens": ids}
  counted = _recorded_matmuls(
      lambda: t5.T5(t5.T5Config(vocab_size=50, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                                num_layers=layers, scan_layers=scan), rngs=nnx.Rngs(0)),
      lambda m: m(batch))
  assert counted == {"attention": per(4) + per(8), "mlp": per(2) + per(2), "head": 1}


def test_unknown_matmul_role_is_refused():
  gin.clear_config()
  gin.bind_parameter("dot_general_for.overrides", {"heads": jax.lax.dot_general})
  try:
    with pytest.raises(UserError, match="overrides has role 'heads'; valid"):
      bert.BertForPretraining(bert.BertConfig(vocab_size=10, hidden=8, num_layers=1,
                                              num_heads=2, mlp_dim=8), rngs=nnx.Rngs(0))
  finally:
    gin.clear_config()


@pytest.mark.parametrize("kernel_shape,contracting", [((4, 5), 0), ((5, 4), 1), ((4, 3), 0),
                                                     ((3, 4), 1)])
def test_default_dot_general_has_lax_values_and_gradients(kernel_shape, contracting):
  """The policy's default matmul only reorders its backward pass (x[..., K] · W, W [K, M] for a
  Dense, [M, K] for a tied head): values and both gradients equal lax.dot_general's."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel_shape), jnp.float32)
  dims = (((2,), (contracting,)), ((), ()))
  loss = lambda dot: lambda x, w: jnp.sin(dot(x, w, dims)).sum()
  np.testing.assert_allclose(precision.dot_general(x, w, dims),
                             jax.lax.dot_general(x, w, dims), rtol=1e-6)
  for ours, plain in zip(jax.grad(loss(precision.dot_general), (0, 1))(x, w),
                         jax.grad(loss(jax.lax.dot_general), (0, 1))(x, w)):
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-6)

