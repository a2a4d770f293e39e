"""DeepSeekMoE routing, balancing and dispatch; MLA; the DeepSeek model's counts and training."""

import dataclasses
import json
import os
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from pretrain_jax.errors import UserError
from pretrain_jax.layers import mla, moe
from pretrain_jax.models import deepseek

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = moe.MoeConfig(num_experts=8, num_shared_experts=1, top_k=2, expert_dim=16, num_groups=4,
                    top_groups=2, routed_scale=2.5)


def _reference_route(scores, bias, cfg):
  """Token by token, in numpy: the best groups by the sum of their two highest biased scores,
  the top-k biased experts inside them, gates from the unbiased scores."""
  experts, gates = [], []
  per_group = cfg.num_experts // cfg.num_groups
  for s in scores:
    choice = s + bias
    group_score = [np.sort(choice[g * per_group:(g + 1) * per_group])[-2:].sum()
                   for g in range(cfg.num_groups)]
    best = np.argsort(group_score)[::-1][:cfg.top_groups]
    eligible = np.concatenate([np.arange(g * per_group, (g + 1) * per_group) for g in best])
    chosen = eligible[np.argsort(choice[eligible])[::-1][:cfg.top_k]]
    g = s[chosen] / s[chosen].sum() * cfg.routed_scale
    order = np.argsort(chosen)
    experts.append(chosen[order])
    gates.append(g[order])
  return np.array(experts), np.array(gates)


def test_group_limited_routing_matches_the_reference_and_the_bias_only_selects():
  rng = np.random.default_rng(0)
  scores = 1 / (1 + np.exp(-rng.normal(size=(200, 8)))).astype(np.float32)
  bias = np.zeros(8, np.float32)
  bias[5] = 10.0  # expert 5 wins every token it is eligible for, at no change to its gate
  experts, gates = moe.route(jnp.asarray(scores), jnp.asarray(bias), CFG)
  order = np.argsort(np.asarray(experts), axis=-1)
  got_e = np.take_along_axis(np.asarray(experts), order, -1)
  got_g = np.take_along_axis(np.asarray(gates), order, -1)
  want_e, want_g = _reference_route(scores, bias, CFG)
  np.testing.assert_array_equal(got_e, want_e)
  np.testing.assert_allclose(got_g, want_g, rtol=1e-6)
  assert (got_e == 5).any(-1).all()  # group 2 always eligible (its biased top-2 sum is huge)
  np.testing.assert_allclose(got_g.sum(-1), 2.5, rtol=1e-6)


def _layer(dispatch, implementation=None, **changes):
  gin.clear_config()
  if implementation:
    gin.bind_parameter("grouped_swiglu.implementation", implementation)
  return moe.MoeMlp(32, dataclasses.replace(CFG, dispatch=dispatch, **changes),
                    rngs=nnx.Rngs(0))


def _x_and_valid():
  x = jax.random.normal(jax.random.key(0), (2, 40, 32))
  return x, jnp.arange(40)[None] < jnp.array([[40], [23]])


def test_dropless_dispatch_equals_the_dense_reference_in_values_and_gradients():
  """Sorted grouped matmuls (row blocks, and jax.lax.ragged_dot) against every expert on every
  token, with padding and group-limited routing: the output and every parameter's gradient."""
  x, valid = _x_and_valid()
  weights = jax.random.normal(jax.random.key(1), x.shape)

  def run(layer):
    loss = lambda m, x: jnp.sum(m(x, valid) * weights)
    value, grads = nnx.value_and_grad(loss, argnums=(0, 1))(layer, x)
    return value, jax.tree.leaves(grads)

  ref_value, ref_grads = run(_layer("dense"))
  for implementation in ("blocks", "ragged_dot"):
    value, grads = run(_layer("dropless", implementation))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    assert len(grads) == len(ref_grads)
    for got, want in zip(grads, ref_grads):
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_bias_update_moves_every_expert_toward_the_mean_load_and_padding_is_no_load():
  x, valid = _x_and_valid()
  layer = _layer("dropless", bias_update_rate=0.01)
  scores = jax.nn.sigmoid(layer.router(x.reshape(-1, 32)))
  experts, _ = moe.route(scores, jnp.zeros(8), layer.cfg)
  counts = np.bincount(np.asarray(experts)[np.asarray(valid).reshape(-1)].reshape(-1),
                       minlength=8)
  layer(x, valid, update_balance=False)  # eval passes leave the bias alone
  np.testing.assert_array_equal(layer.bias[...], 0.0)
  layer(x, valid, update_balance=True)
  np.testing.assert_allclose(layer.bias[...], 0.01 * np.sign(counts.mean() - counts))
  assert int(layer.bias_updates[...]) == 1
  np.testing.assert_allclose(layer.load_max[...], counts.max() / counts.mean(), rtol=1e-6)
  np.testing.assert_allclose(layer.load_min[...], counts.min() / counts.mean(), rtol=1e-6)
  stopped = _layer("dropless", bias_update_rate=0.01, bias_update_steps=1)
  for _ in range(3):
    stopped(x, valid, update_balance=True)
  assert np.abs(np.asarray(stopped.bias[...])).max() <= 0.01 + 1e-7  # γ = 0 after one pass


def test_capacity_drops_the_latest_slots_past_each_experts_capacity():
  x, valid = _x_and_valid()
  layer = _layer("dense", capacity_factor=0.5)
  scores = jax.nn.sigmoid(layer.router(x.reshape(-1, 32)))
  experts, _ = moe.route(scores, jnp.zeros(8), layer.cfg)
  experts, valid_t = np.asarray(experts), np.asarray(valid).reshape(-1)
  capacity = int(np.ceil(0.5 * experts.size / 8))
  seen, kept = np.zeros(8, int), 0
  for t in range(experts.shape[0]):  # token order, then slot order within a token
    for e in experts[t]:
      if valid_t[t]:
        kept += seen[e] < capacity
        seen[e] += 1
  layer(x, valid)
  np.testing.assert_allclose(layer.dropped[...], 1 - kept / seen.sum(), rtol=1e-6)
  assert 0.1 < float(layer.dropped[...]) < 0.9


def test_balance_loss_is_alpha_times_sum_of_load_and_probability_products():
  rng = np.random.default_rng(2)
  scores = rng.random((3, 10, 8)).astype(np.float32)
  experts = np.stack([np.argsort(-s, axis=-1)[:, :2] for s in scores])
  valid = np.ones((3, 10), bool)
  valid[2, 6:] = False
  want = []
  for s, e, v in zip(scores, experts, valid):
    s, e = s[v], e[v]
    f = 8 / (2 * len(s)) * np.bincount(e.reshape(-1), minlength=8)
    p = (s / s.sum(-1, keepdims=True)).mean(0)
    want.append((f * p).sum())
  got = moe.balance_loss(jnp.asarray(scores), jnp.asarray(experts), jnp.asarray(valid), 1e-4)
  np.testing.assert_allclose(got, 1e-4 * np.mean(want), rtol=1e-5)


def test_dropless_layer_flops_are_within_ten_percent_of_the_activated_experts():
  """XLA's count for one MoE layer's forward (16 experts, top-4, 2048 tokens) against the
  ideal: the router and the shared and top-k routed experts' SwiGLUs."""
  cfg = moe.MoeConfig(num_experts=16, num_shared_experts=1, top_k=4, expert_dim=64,
                      num_groups=4, top_groups=2)
  gin.clear_config()
  layer = moe.MoeMlp(256, cfg, rngs=nnx.Rngs(0))
  x = jnp.zeros((16, 128, 256))
  graphdef, state = nnx.split(layer)
  forward = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
  flops = forward.lower(state, x).compile().cost_analysis()["flops"]
  tokens = 16 * 128
  ideal = 2 * tokens * (256 * 16 + (cfg.top_k + 1) * 3 * 256 * 64)
  print(f"XLA / ideal = {flops / ideal:.3f}")
  assert 1.0 <= flops / ideal <= 1.10


def test_bad_moe_config_is_refused():
  with pytest.raises(UserError, match="top_k=5 exceeds the 1 groups' 4 experts"):
    moe.MoeConfig(num_experts=16, top_k=5, num_groups=4, top_groups=1)
  with pytest.raises(UserError, match="num_groups=3 does not divide num_experts=16"):
    moe.MoeConfig(num_experts=16, num_groups=3)


# MLA -------------------------------------------------------------------------------------------


def test_mla_equals_the_papers_equations_in_numpy():
  """Per head, in float64, from the module's own weights: compressed queries, the joint KV
  latent, the shared RoPE key, softmax scale 1/√(d_h + d_h^R), causal mask."""
  gin.clear_config()
  layer = helpers.perturbed(mla.MultiHeadLatentAttention(
      32, 2, q_lora_rank=12, kv_lora_rank=8, qk_nope_dim=6, qk_rope_dim=4, v_head_dim=5,
      rngs=nnx.Rngs(0)), 0)
  x = np.random.default_rng(0).normal(size=(1, 7, 32)).astype(np.float32)
  positions = np.arange(7)[None]
  from pretrain_jax.layers.attention import SegmentMask
  out = layer(jnp.asarray(x), SegmentMask(np.ones((1, 7), int), np.ones((1, 7), int), True),
              jnp.asarray(positions))
  w = lambda d: np.asarray(d.kernel[...], np.float64)
  rms = lambda v, g: v / np.sqrt((v ** 2).mean(-1, keepdims=True) + 1e-6) * np.asarray(g)

  def rope(v):  # half-split pairs, θ = 10000, over positions 0..6
    half = v.shape[-1] // 2
    angle = positions[0][:, None] * 10_000.0 ** (-np.arange(half) / half)
    if v.ndim == 3:
      angle = angle[:, None]
    a, b = v[..., :half], v[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle),
                           b * np.cos(angle) + a * np.sin(angle)], -1)

  h = x[0].astype(np.float64)
  c_q = rms(h @ w(layer.query_down), layer.query_norm.scale[...])
  q = np.einsum("lc,chk->lhk", c_q, w(layer.query_up))
  q = np.concatenate([q[..., :6], rope(q[..., 6:])], -1)
  c_kv = rms(h @ w(layer.kv_down), layer.kv_norm.scale[...])
  k_rope = rope(h @ w(layer.key_rope))
  k_nope = np.einsum("lc,chk->lhk", c_kv, w(layer.key_up))
  v = np.einsum("lc,chk->lhk", c_kv, w(layer.value_up))
  k = np.concatenate([k_nope, np.repeat(k_rope[:, None], 2, 1)], -1)
  logits = np.einsum("lhk,shk->hls", q, k) / np.sqrt(10)
  logits = np.where(np.tril(np.ones((7, 7), bool)), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o = np.einsum("hls,shv->lhv", probs, v)
  want = np.einsum("lhv,hvd->ld", o, w(layer.out))
  np.testing.assert_allclose(out[0], want, rtol=2e-4, atol=2e-5)


# The model -------------------------------------------------------------------------------------


def _tiny_cfg(**changes):
  gin.clear_config()
  gin.parse_config_files_and_bindings([os.path.join(REPO, "gin_configs/models/deepseek_tiny.gin")],
                                      [], skip_unknown=False)
  with gin.unlock_config():
    cfg = deepseek.DeepSeekConfig()
  return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("changes", [{}, dict(moe_layer_dense_dim=325),
                                     dict(num_dense_layers=4)])
def test_parameter_formula_equals_the_built_model(changes):
  """The MoE config, its dense arm at equal activated parameters
  (scripts/deepseek_tiny_study.py), and DeepSeek with no MoE layer: a token activates all but
  the unread experts and rows."""
  cfg = _tiny_cfg(**changes)
  model = nnx.eval_shape(lambda: deepseek.DeepSeek(cfg, rngs=nnx.Rngs(0)))
  modules = [m for _, m in nnx.iter_graph(model)]
  assert any(isinstance(m, moe.MoeMlp) for m in modules) == (not changes)
  params = nnx.state(model, nnx.Param)
  mtp = sum(x.size for p, x in nnx.to_flat_state(params) if p[0] == "mtp")
  counts = deepseek.param_counts(cfg)
  assert counts["total"] == helpers.param_count(model) - mtp
  assert counts["mtp_total"] == mtp
  m = cfg.moe
  inactive = (0 if changes else
              cfg.num_moe_layers * (m.num_experts - m.top_k) * 3 * cfg.hidden * m.expert_dim)
  assert counts["activated"] == counts["total"] - inactive - (cfg.vocab_size - 1) * cfg.hidden


def test_the_matched_dense_arm_activates_what_the_moe_does():
  """1 shared + top-4 routed experts of 64 and the 256 × 16 router: 768 W ≈ 249,856, W = 325."""
  a = deepseek.param_counts(_tiny_cfg())["activated"]
  b = deepseek.param_counts(_tiny_cfg(moe_layer_dense_dim=325))["activated"]
  assert a - b == 3 * 256  # 768 · 325 is 256 short of the MoE layer's 249,856


def test_info_of_deepseek_v3_counts_671b_total_and_37b_activated():
  out = subprocess.run(
      [sys.executable, "-m", "pretrain_jax", "info", "--gin_file=models/deepseek_v3_671b.gin",
       "--json"], capture_output=True, text=True, cwd=REPO, check=True)
  info = json.loads(out.stdout.strip().splitlines()[-1])
  main = info["total_params"] - info["mtp_params"]
  print(info)
  assert abs(main / 671e9 - 1) < 0.01, main
  # The papers round: 36.63B here, 1.01 % under "37B" (this count gives V2-Lite 2.45B of 2.4B).
  assert 36.5e9 <= info["activated_params"] < 37.5e9, info["activated_params"]
  assert 11e9 < info["mtp_params"] < 12e9  # one MoE block + projection (embedding, head shared)


def test_the_bias_alone_balances_a_fixed_router():
  """V3's claim at the layer: the router's weights frozen, 300 bias updates (γ = 0.003) bring
  the busiest expert from ~3× the mean load to near it (a large γ stalls coarser: the sign
  rule's steps overshoot)."""
  x = (jax.random.normal(jax.random.key(0), (4, 128, 32))
       + 3.0 * jax.random.normal(jax.random.key(3), (1, 1, 32)))  # a shared offset: skewed
  valid = jnp.ones((4, 128), bool)
  layer = _layer("dropless", bias_update_rate=0.003)
  step = nnx.jit(lambda m, x: m(x, valid, update_balance=True))
  step(layer, x)
  before = float(layer.load_max[...])
  for _ in range(300):
    step(layer, x)
  after = float(layer.load_max[...])
  print(f"load max/mean {before:.2f} -> {after:.2f}")
  assert before > 2.5 and after < 1.3


def test_tiny_deepseek_trains_with_mtp_and_logs_the_expert_load(tmp_path):
  records = helpers.train(tmp_path, ["experiments/deepseek_tiny_cpu.gin"], [
      "train.num_steps = 40", "train.batch_size = 8", "train.sequence_length = 64",
      "train.log_every = 10", "train.eval_every = 0", "train.checkpoint_every = 100",
      "DeepSeekConfig.num_layers = 3", "DeepSeekConfig.hidden = 64",
      "DeepSeekConfig.dense_mlp_dim = 128", "MoeConfig.expert_dim = 16",
      "DeepSeekConfig.max_positions = 64", "warmup_cosine_decay.warmup_steps = 5"])
  train = [r for r in records if r["split"] == "train"]
  print([(r["step"], r["perplexity"], r["aux/mtp_cross_entropy/0"]) for r in train])
  assert train[-1]["perplexity"] < 0.5 * train[0]["perplexity"]
  assert train[-1]["aux/mtp_cross_entropy/0"] < train[0]["aux/mtp_cross_entropy/0"] - 0.5
  loads = [train[-1][f"aux/moe_layers/block/mlp/load_max/{i}"] for i in range(2)]
  assert all(1.0 <= v <= 16.0 for v in loads), loads  # max/mean of 16 experts


# Expert parallelism ----------------------------------------------------------------------------


def _lm_batch(batch_size=8, length=32, vocab=8128, seed=0):
  rng = np.random.default_rng(seed)
  segments = np.ones((batch_size, length), np.int32)
  segments[1, 20:] = 2  # two documents packed in row 1
  segments[2, 25:] = 0  # padding in row 2
  return {"decoder_input_tokens": rng.integers(1, vocab, (batch_size, length)).astype(np.int32),
          "decoder_target_tokens": rng.integers(1, vocab, (batch_size, length)).astype(np.int32),
          "decoder_loss_weights": (segments != 0).astype(np.float32),
          "decoder_segment_ids": segments,
          "decoder_positions": np.broadcast_to(np.arange(length), (batch_size, length)).copy()}


def test_expert_parallel_on_data2_expert4_equals_one_device_and_shards_the_experts():
  """The tiny DeepSeek (MLA, 16 experts, MTP) trained 3 steps: dropless on one device against
  expert_parallel on 8 fake devices (data 2 × expert 4): the same losses; each device holds
  4 of the 16 experts' weights and the step exchanges slots by all-to-all."""
  from pretrain_jax.objectives.causal_lm import causal_lm_loss
  from pretrain_jax.training import partitioning, trainer

  def train(dispatch, mesh):
    cfg = _tiny_cfg(num_layers=2, hidden=64, dense_mlp_dim=128, max_positions=32)
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_dim=16,
                                                           dispatch=dispatch))
    setup = trainer.Setup(lambda seed: deepseek.DeepSeek(cfg, rngs=nnx.Rngs(seed)),
                          causal_lm_loss, num_steps=10, mesh=mesh)
    state, losses = setup.init_state(), []
    for step in range(3):
      state, metrics = setup.train_step(state, _lm_batch(seed=step))
      losses.append(float(metrics["loss"][0] / metrics["loss"][1]))
    return setup, state, losses

  _, _, single = train("dropless", partitioning.make_mesh(num_devices=1))
  mesh = partitioning.make_mesh(data=2, expert=4)
  setup, state, parallel = train("expert_parallel", mesh)
  print("1 device :", single, "\ndata 2 × expert 4:", parallel)
  np.testing.assert_allclose(parallel, single, rtol=2e-5)
  wi_gate = state.params["moe_layers"]["block"]["mlp"]["wi_gate"][...]
  print("wi_gate", wi_gate.shape, wi_gate.sharding.spec, wi_gate.addressable_shards[0].data.shape)
  assert wi_gate.shape == (1, 16, 64, 16)
  assert {s.data.shape for s in wi_gate.addressable_shards} == {(1, 4, 64, 16)}
  hlo = setup.compile_step(setup.batch_to_device(_lm_batch())).as_text()
  assert "all-to-all" in hlo


# MLA decoding ----------------------------------------------------------------------------------


def _small_model(seed=0, **changes):
  cfg = _tiny_cfg(num_layers=3, hidden=64, dense_mlp_dim=128, max_positions=64, vocab_size=64,
                  **changes)
  cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, expert_dim=16))
  return helpers.perturbed(deepseek.DeepSeek(cfg, rngs=nnx.Rngs(seed)), seed)


def test_absorbed_latent_cache_decoding_equals_recomputation_for_a_ragged_batch():
  """Prefill + one token at a time through the compressed cache (c_KV and k_R only, W_UK
  absorbed into the queries): the logits of the full forward pass at every position, and
  greedy generation of a left-padded batch equal to recomputing each row from scratch."""
  from pretrain_jax.inference import decoding
  model = _small_model(seed=1, mtp_depth=0)
  tokens = np.random.default_rng(5).integers(1, 64, size=(1, 10))
  full = np.asarray(model(jnp.asarray(tokens)))[0]
  cache = model.init_cache(1, 10)
  assert cache.keys[0].shape == (1, 1, 10, 1, 64) and cache.values[0].shape == (1, 1, 10, 1, 16)
  np.testing.assert_allclose(helpers.cached_logits(model, tokens, prefill=6), full, rtol=1e-4,
                             atol=1e-4)

  rng = np.random.default_rng(2)
  prompts = [rng.integers(1, 64, size=n).tolist() for n in (9, 1, 4)]
  cached = decoding.generate(model, prompts, 8)
  graphdef, state = nnx.split(model)

  @jax.jit
  def last_logits(state, tokens_1W, length):  # right-padded: causal, so length - 1 is exact
    segments_1W = (jnp.arange(tokens_1W.shape[1]) < length)[None].astype(jnp.int32)
    logits = nnx.merge(graphdef, state)(tokens_1W, segment_ids_BL=segments_1W)
    return logits[0, length - 1]

  for prompt, generated in zip(prompts, cached):
    sequence = list(prompt)
    for _ in range(8):
      padded = jnp.asarray([sequence + [0] * (17 - len(sequence))])
      sequence.append(int(jnp.argmax(last_logits(state, padded, len(sequence)))))
    assert generated == sequence[len(prompt):]


def test_v3_cache_is_576_numbers_per_layer_against_mha_32768():
  gin.clear_config()  # the dataclass defaults: V3's dimensions
  cfg = deepseek.DeepSeekConfig(dtype="bfloat16")
  model = nnx.eval_shape(lambda: deepseek.DeepSeek(cfg, rngs=nnx.Rngs(0)))
  per_token = model.cache_bytes_per_token()
  assert per_token == {"mla": 61 * (512 + 64) * 2, "mha": 61 * 2 * 128 * 128 * 2}
  cache = jax.eval_shape(lambda: model.init_cache(1, 4))
  assert sum(a.size for a in jax.tree.leaves((cache.keys, cache.values))) == 4 * 61 * 576
