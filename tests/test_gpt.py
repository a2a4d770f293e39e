"""The decoder family: published parameter counts, a NumPy reference forward pass, packing,
KV-cache decoding == recomputation, and the samplers' statistics."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import cached_logits, param_count, perturbed
from pretrain_jax.config import bound, configure
from pretrain_jax.inference import decoding
from pretrain_jax.inference.sampling import Sampling
from pretrain_jax.models import gpt

VARIANTS = {
    "gpt1": dict(norm="post_layernorm", scale_residual_init=False),
    "gpt2": dict(norm="pre_layernorm"),
    "modern": dict(norm="pre_rmsnorm", positions="rope", mlp="swiglu", num_kv_heads=2,
                   use_bias=False, tie_embeddings=False),
}


def _config(variant, **overrides):
  gin.clear_config()  # GptConfig is gin-configurable: no binding from another test may leak in
  kw = dict(vocab_size=61, hidden=32, num_layers=2, num_heads=4, mlp_dim=48, max_positions=64,
            dropout_rate=0.0, **VARIANTS[variant])
  return gpt.GptConfig(**{**kw, **overrides})


def _model(variant, seed=0, **overrides):
  """A model whose every parameter (biases and norm scales included) is non-trivial."""
  return perturbed(gpt.Gpt(_config(variant, **overrides), rngs=nnx.Rngs(seed)), seed)


@pytest.mark.parametrize("gin_file,expected", [
    ("models/gpt1.gin", 116_534_784),  # GPT-1: "117M"
    ("models/gpt2_small.gin", 124_439_808),  # GPT-2 small: "124M" (HF gpt2 has the same count)
    ("models/gpt2_medium.gin", 354_823_168),  # GPT-2 medium: "355M"
])
def test_published_parameter_counts(gin_file, expected):
  gin.clear_config()
  configure([gin_file], [])
  model = nnx.eval_shape(lambda: bound("train.model")(0))
  counted = param_count(model)
  assert counted == expected == gpt.param_count(model.cfg)


def test_gpt2_small_paper_recipe_builds_without_touching_data():
  gin.clear_config()
  configure(["experiments/gpt2_small_paper.gin"], [])
  model = nnx.eval_shape(lambda: bound("train.model")(0))
  assert gpt.param_count(model.cfg) == 124_439_808 + (50304 - 50257) * 768  # padded vocab
  assert (bound("train.batch_size"), bound("train.sequence_length")) == (512, 1024)
  assert bound("make_optimizer.b2") == 0.95 and bound("warmup_cosine_decay.learning_rate") == 6e-4
  from pretrain_jax.errors import UserError
  with pytest.raises(UserError, match="VOCAB_FILE"):
    bound("train.task")  # resolving the task needs the user's vocabulary


def test_modern_decoder_parameter_count_by_formula():
  gin.clear_config()
  configure(["models/modern_decoder_small.gin"], [])
  model = nnx.eval_shape(lambda: bound("train.model")(0))
  cfg = model.cfg
  d, f, v, l, k = cfg.hidden, cfg.mlp_dim, cfg.vocab_size, cfg.num_layers, cfg.head_size
  by_hand = 2 * v * d + l * (d * k * (12 + 2 * 4) + 12 * k * d + 3 * d * f + 2 * d) + d
  assert param_count(model) == by_hand


# A NumPy reference written from the papers' equations -----------------------------------------

def _np(x):
  return np.asarray(x, np.float64)


def _norm(x, p, cfg):
  if cfg.norm == "pre_rmsnorm":
    return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + cfg.norm_eps) * _np(p["scale"])
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + cfg.norm_eps) * _np(p["scale"]) + _np(p["bias"])


def _dense(x, p, spec):
  y = np.einsum(spec, x, _np(p["kernel"]))
  return y + _np(p["bias"]) if "bias" in p else y


def _rope(x_LHK, positions, theta):
  """Rotary embedding as complex multiplication: (x_i + i·x_{i+d/2}) · e^{i·pos·θ^(−2i/d)}."""
  half = x_LHK.shape[-1] // 2
  z = x_LHK[..., :half] + 1j * x_LHK[..., half:]
  freqs = theta ** (-np.arange(half) / half)
  z = z * np.exp(1j * positions[:, None, None] * freqs)
  return np.concatenate([z.real, z.imag], axis=-1)


def _attention(x, p, cfg):
  q = _dense(x, p["query"], "ld,dhk->lhk")
  k = _dense(x, p["key"], "ld,dgk->lgk")
  v = _dense(x, p["value"], "ld,dgk->lgk")
  length = x.shape[0]
  if cfg.positions == "rope":
    q, k = _rope(q, np.arange(length), cfg.rope_theta), _rope(k, np.arange(length), cfg.rope_theta)
  group = cfg.num_heads // cfg.kv_heads
  out = np.zeros_like(q)
  for h in range(cfg.num_heads):
    scores = q[:, h] @ k[:, h // group].T / np.sqrt(cfg.head_size)
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    out[:, h] = (probs / probs.sum(-1, keepdims=True)) @ v[:, h // group]
  return _dense(out, p["out"], "lhk,hkd->ld")


def _mlp(x, p, cfg):
  if cfg.mlp == "swiglu":
    gate = _dense(x, p["wi_gate"], "ld,df->lf")
    return _dense(gate / (1 + np.exp(-gate)) * _dense(x, p["wi_up"], "ld,df->lf"), p["wo"],
                  "lf,fd->ld")
  h = _dense(x, p["wi"], "ld,df->lf")
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))
  return _dense(h, p["wo"], "lf,fd->ld")


def reference_logits(model, tokens):
  cfg = model.cfg
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  x = _np(p["token_embed"]["embedding"])[tokens]
  if cfg.positions == "learned":
    x = x + _np(p["position_embed"]["embedding"])[:len(tokens)]
  for i in range(cfg.num_layers):
    lp = jax.tree.map(lambda a, i=i: a[i], p["layers"]["block"])  # layer i of the stack
    if cfg.norm == "post_layernorm":
      a = _norm(x + _attention(x, lp["attention"], cfg), lp["attention_norm"], cfg)
      x = _norm(a + _mlp(a, lp["mlp"], cfg), lp["mlp_norm"], cfg)
    else:
      x = x + _attention(_norm(x, lp["attention_norm"], cfg), lp["attention"], cfg)
      x = x + _mlp(_norm(x, lp["mlp_norm"], cfg), lp["mlp"], cfg)
  if cfg.norm != "post_layernorm":
    x = _norm(x, p["final_norm"], cfg)
  if cfg.tie_embeddings:
    return x @ _np(p["token_embed"]["embedding"]).T
  return x @ _np(p["lm_head"]["kernel"])


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_forward_matches_numpy_reference(variant):
  model = _model(variant)
  tokens = np.random.default_rng(0).integers(0, 61, size=(2, 13))
  logits = np.asarray(model(jnp.asarray(tokens)))
  for row in range(2):
    np.testing.assert_allclose(logits[row], reference_logits(model, tokens[row]),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_packed_documents_do_not_see_each_other(variant):
  """A row packing documents A and B gives each exactly the logits it gets alone."""
  model = _model(variant)
  rng = np.random.default_rng(1)
  a, b = rng.integers(1, 61, size=7), rng.integers(1, 61, size=5)
  packed = np.concatenate([a, b, [0, 0, 0, 0]])[None]
  segments = np.array([[1] * 7 + [2] * 5 + [0] * 4])
  positions = np.array([list(range(7)) + list(range(5)) + [0] * 4])
  logits = np.asarray(model(jnp.asarray(packed), positions_BL=jnp.asarray(positions),
                            segment_ids_BL=jnp.asarray(segments)))
  np.testing.assert_allclose(logits[0, :7], np.asarray(model(jnp.asarray(a[None])))[0],
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[0, 7:12], np.asarray(model(jnp.asarray(b[None])))[0],
                             rtol=1e-5, atol=1e-5)


# KV-cache decoding ---------------------------------------------------------------------------

def _greedy_by_recomputation(model, prompt, steps):
  """The definition: run the full forward pass over everything so far, take the argmax."""
  sequence = list(prompt)
  for _ in range(steps):
    sequence.append(int(jnp.argmax(model(jnp.asarray([sequence]))[0, -1])))
  return sequence[len(prompt):]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_kv_cache_decoding_equals_recomputation_for_a_ragged_batch(variant):
  model = _model(variant, seed=3)
  rng = np.random.default_rng(2)
  prompts = [rng.integers(1, 61, size=n).tolist() for n in (9, 1, 4, 6)]
  steps = 16
  cached = decoding.generate(model, prompts, steps)
  assert [len(c) for c in cached] == [steps] * 4
  for prompt, tokens in zip(prompts, cached):
    assert tokens == _greedy_by_recomputation(model, prompt, steps)
  # and each row decodes exactly as it does alone (left padding changes nothing)
  assert decoding.generate(model, prompts[2:3], steps) == cached[2:3]


def test_kv_cache_logits_equal_full_forward_logits():
  model = _model("modern", seed=4)
  tokens = np.random.default_rng(5).integers(1, 61, size=(1, 10))
  full = np.asarray(model(jnp.asarray(tokens)))[0]
  np.testing.assert_allclose(cached_logits(model, tokens, prefill=6), full, rtol=1e-5,
                             atol=1e-5)


def test_generation_stops_at_eos_per_row():
  model = _model("gpt2", seed=6)
  prompts = [[5, 6, 7], [9, 10]]
  free = decoding.generate(model, prompts, 12)
  eos = free[0][3]
  first = free[0].index(eos)
  stopped = decoding.generate(model, prompts, 12, eos_id=eos)
  assert stopped[0] == free[0][:first]
  row1_end = free[1].index(eos) if eos in free[1] else 12
  assert stopped[1] == free[1][:row1_end]


def test_learned_positions_refuse_a_cache_past_max_positions():
  from pretrain_jax.errors import UserError
  model = _model("gpt2", max_positions=16)
  with pytest.raises(UserError, match="max_positions=16"):
    decoding.generate(model, [[1, 2, 3, 4, 5]], 12)


# Samplers -------------------------------------------------------------------------------------

LOGITS = np.array([2.0, 1.5, 1.0, 0.5, 0.0, -1.0, -3.0])


def _expected(temperature, top_k, top_p):
  probs = np.exp(LOGITS / temperature)
  probs /= probs.sum()
  order = np.argsort(-probs)
  keep = np.zeros_like(probs, bool)
  keep[order[:top_k or len(probs)]] = True
  probs = np.where(keep, probs, 0)
  probs /= probs.sum()
  mass_before = np.cumsum(probs[order]) - probs[order]
  nucleus = np.zeros_like(keep)
  nucleus[order[mass_before < top_p]] = True
  probs = np.where(nucleus, probs, 0)
  return probs / probs.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.8), (1.3, 5, 0.9)])
def test_sampling_frequencies_match_the_filtered_distribution(temperature, top_k, top_p):
  sampling = Sampling(temperature, top_k, top_p)
  n = 40_000
  keys = jax.random.split(jax.random.key(0), n)
  draws = np.asarray(jax.vmap(lambda k: sampling(jnp.asarray(LOGITS)[None], k)[0])(keys))
  frequencies = np.bincount(draws, minlength=len(LOGITS)) / n
  expected = _expected(temperature, top_k, top_p)
  assert np.all(frequencies[expected == 0] == 0), "sampled outside the top-k / nucleus set"
  # 4.5 standard deviations of a binomial frequency at n = 40,000 is at most 0.0113
  np.testing.assert_allclose(frequencies, expected, atol=0.0113)


def test_greedy_is_argmax_and_bad_settings_are_refused():
  from pretrain_jax.errors import UserError
  assert int(Sampling()(jnp.asarray(LOGITS)[None], jax.random.key(0))[0]) == 0
  for bad in (dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0), dict(top_p=1.5)):
    with pytest.raises(UserError):
      Sampling(**bad)
