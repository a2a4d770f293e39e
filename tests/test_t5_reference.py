"""T5 / T5.1.1 and the T5 paper's architecture variants against a NumPy (float64) reference
written from the equations of Raffel et al. 2020 (plus the T5.1.1 changes), not from the code:

    x⁰ = E[tokens]                       one embedding for both stacks, no scaling, no positions
    RMSNorm(x) = x / √(mean(x²) + ε) · g  no mean subtraction, no bias
    Attn: softmax(Q Kᵀ + B) V            no 1/√d_kv, no biases; B = the stack's relative bias
    encoder layer:  x += Attn(N(x)) over non-padding keys;  x += FF(N(x))
    decoder layer:  y += causal Attn(N(y));  y += CrossAttn(N(y), enc) over non-padding inputs
                    (no position bias);  y += FF(N(y))
    each stack ends with an RMSNorm
    FF = W_o ReLU(W_i x) (T5)   or   W_o (GELU_tanh(W_0 x) ⊙ W_1 x) (T5.1.1)
    logits = y Eᵀ d^-½ (tied)   or   y W_out (untied)
"""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import perturbed
from pretrain_jax.models import t5

VARIANTS = {
    "t5": dict(mlp="relu", tie_embeddings=True),
    "t5_1_1": dict(mlp="gated-gelu", tie_embeddings=False),
}
VOCAB, BUCKETS, MAX_DISTANCE = 50, 8, 8
SHARED = ("attention_norm", "attention", "mlp_norm", "mlp")  # encoder_decoder_shared's tied parts
TOL = dict(rtol=1e-4, atol=1e-4)


def _config(variant, architecture="encoder_decoder", **overrides):
  gin.clear_config()  # T5Config is gin-configurable: no binding from another test may leak in
  kw = dict(vocab_size=VOCAB, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_layers=2,
            architecture=architecture, relative_buckets=BUCKETS,
            relative_max_distance=MAX_DISTANCE, dropout_rate=0.0, **VARIANTS[variant])
  return t5.T5Config(**{**kw, **overrides})


def _model(variant, architecture="encoder_decoder", seed=0, **overrides):
  """A model whose every parameter (norm scales and bias tables included) is non-trivial."""
  return perturbed(t5.T5(_config(variant, architecture, **overrides), rngs=nnx.Rngs(seed)), seed)


def _params(model):
  return jax.tree.map(lambda x: np.asarray(x, np.float64),
                      nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def _count(tree):
  return sum(np.size(x) for x in jax.tree.leaves(tree))


# The relative position buckets, from their definition ------------------------------------------

def reference_bucket(relative_position: int, *, bidirectional: bool, num_buckets: int,
                     max_distance: int) -> int:
  """relative_position = key − query. Bidirectional: half the buckets per direction, the
  upper half for keys after the query; causal: only the past, n = max(query − key, 0).
  n < max_exact (half of the per-direction buckets) gets its own bucket; beyond that
      bucket = max_exact + ⌊log(n / max_exact) / log(max_distance / max_exact) · (B − max_exact)⌋
  clipped to the last bucket B − 1. The floor is evaluated exactly in integers:
  it is the largest k with (n / max_exact)^(B − max_exact) ≥ (max_distance / max_exact)^k."""
  offset, buckets = 0, num_buckets
  if bidirectional:
    buckets //= 2
    offset = buckets if relative_position > 0 else 0
    n = abs(relative_position)
  else:
    n = max(-relative_position, 0)
  max_exact = buckets // 2
  if n < max_exact:
    return offset + n
  span = buckets - max_exact
  k = 0
  while (k + 1 <= span
         and n ** span * max_exact ** (k + 1) >= max_distance ** (k + 1) * max_exact ** span):
    k += 1
  return offset + min(max_exact + k, buckets - 1)


def _bucket_matrix(query_len, key_len, bidirectional):
  return np.array([[reference_bucket(k - q, bidirectional=bidirectional, num_buckets=BUCKETS,
                                     max_distance=MAX_DISTANCE)
                    for k in range(key_len)] for q in range(query_len)])


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (8, 16)])
@pytest.mark.parametrize("bidirectional", [True, False])
def test_relative_position_bucket_matches_definition(num_buckets, max_distance, bidirectional):
  relative = np.arange(-300, 301)
  got = np.asarray(t5.relative_position_bucket(
      jnp.asarray(relative), bidirectional=bidirectional, num_buckets=num_buckets,
      max_distance=max_distance))
  expected = np.array([reference_bucket(int(r), bidirectional=bidirectional,
                                        num_buckets=num_buckets, max_distance=max_distance)
                       for r in relative])
  wrong = relative[got != expected]
  assert wrong.size == 0, (f"buckets differ at relative positions {wrong[:20]}: "
                           f"got {got[got != expected][:20]}, expected "
                           f"{expected[got != expected][:20]}")
  # every bucket (exact, log-spaced, clipped) is reached, except that a bidirectional table
  # never uses the first bucket of its upper half: distance 0 always falls in the lower half
  assert set(expected) == set(range(num_buckets)) - ({num_buckets // 2} if bidirectional else set())


def test_reference_bucket_spot_values():
  """Hand-computed values: (32, 128) bidirectional spends 16 per direction, 8 exact."""
  b = lambda r, bd: reference_bucket(r, bidirectional=bd, num_buckets=32, max_distance=128)
  assert [b(r, True) for r in (0, -1, -7, 1, 7)] == [0, 1, 7, 17, 23]
  # n = 16: 8 + ⌊log 2 / log 16 · 8⌋ = 10; n = 64: 8 + ⌊6⌋ = 14; n ≥ 128 clipped to 15
  assert [b(r, True) for r in (-16, -64, -127, -128, -1000)] == [10, 14, 15, 15, 15]
  assert [b(r, True) for r in (16, 64, 1000)] == [26, 30, 31]
  # causal: 16 exact buckets of the past, the future is bucket 0
  assert [b(r, False) for r in (5, 0, -15, -16, -1000)] == [0, 0, 15, 16, 31]


# The forward pass ------------------------------------------------------------------------------

def _rmsnorm(x, p, eps):
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * p["scale"]


def _attention(x_LD, context_SD, p, allowed_LS, bias_HLS=None):
  q = np.einsum("ld,dhk->lhk", x_LD, p["query"]["kernel"])
  k = np.einsum("sd,dhk->shk", context_SD, p["key"]["kernel"])
  v = np.einsum("sd,dhk->shk", context_SD, p["value"]["kernel"])
  scores = np.einsum("lhk,shk->hls", q, k)  # T5: no 1/√d_kv
  if bias_HLS is not None:
    scores = scores + bias_HLS
  scores = np.where(allowed_LS[None], scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  out = np.einsum("hls,shk->lhk", probs, v)
  return np.einsum("lhk,hkd->ld", out, p["out"]["kernel"])


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _ff(x, p, cfg):
  if cfg.mlp == "gated-gelu":
    h = _gelu_tanh(x @ p["wi_gate"]["kernel"]) * (x @ p["wi_up"]["kernel"])
  else:
    h = np.maximum(x @ p["wi"]["kernel"], 0.0)
  return h @ p["wo"]["kernel"]


def _position_bias(table, length, bidirectional):
  return np.transpose(table[_bucket_matrix(length, length, bidirectional)], (2, 0, 1))  # H,L,S


def _block(x, p, cfg, allowed, bias, context=None, context_allowed=None):
  eps = cfg.layer_norm_eps
  h = _rmsnorm(x, p["attention_norm"], eps)
  x = x + _attention(h, h, p["attention"], allowed, bias)
  if context is not None:
    h = _rmsnorm(x, p["cross_norm"], eps)
    x = x + _attention(h, context, p["cross_attention"], context_allowed)  # no position bias
  return x + _ff(_rmsnorm(x, p["mlp_norm"], eps), p["mlp"], cfg)


def _logits(y, p, cfg):
  if cfg.tie_embeddings:
    return y @ p["token_embed"]["embedding"].T * cfg.d_model ** -0.5
  return y @ p["lm_head"]["kernel"]


def _unstack(block, n):
  """A scanned stack's parameters ([layers, ...] arrays) as one dict per layer."""
  return {i: jax.tree.map(lambda a, i=i: a[i], block) for i in range(n)}


def _layers(p, cfg):
  """(encoder layers, decoder layers); in the shared variant the decoder's self-attention, FF
  and their norms are the encoder's, stored once (in whichever stack nnx lists first)."""
  n = cfg.num_layers
  enc = _unstack(p.get("encoder", {}).get("layers", {}).get("block", {}), n)
  dec = _unstack(p["decoder"]["layers"]["block"], n)
  if cfg.architecture != "encoder_decoder_shared":
    return [enc.get(i) for i in range(n)], [dec[i] for i in range(n)]
  encoder_layers, decoder_layers = [], []
  for i in range(n):
    shared = {}
    for name in SHARED:
      holders = [s for s in (enc.get(i, {}), dec[i]) if name in s]
      assert len(holders) == 1, f"layer {i} {name}: stored {len(holders)} times, expected once"
      shared[name] = holders[0][name]
    encoder_layers.append(shared)
    decoder_layers.append({**dec[i], **shared})
  return encoder_layers, decoder_layers


def reference_encoder_decoder(model, encoder_tokens, decoder_tokens):
  cfg = model.cfg
  p = _params(model)
  embed = p["token_embed"]["embedding"]
  encoder_layers, decoder_layers = _layers(p, cfg)
  valid = encoder_tokens > 0
  x = embed[encoder_tokens]
  enc_bias = _position_bias(p["encoder"]["position_bias"]["embedding"]["embedding"],
                            len(encoder_tokens), bidirectional=True)
  enc_allowed = np.broadcast_to(valid[None, :], (len(x), len(x)))  # padding keys invisible
  for lp in encoder_layers:
    x = _block(x, lp, cfg, enc_allowed, enc_bias)
  context = _rmsnorm(x, p["encoder"]["final_norm"], cfg.layer_norm_eps)
  length = len(decoder_tokens)
  y = embed[decoder_tokens]
  dec_bias = _position_bias(p["decoder"]["position_bias"]["embedding"]["embedding"], length,
                            bidirectional=False)
  causal = np.tril(np.ones((length, length), bool))
  cross_allowed = np.broadcast_to(valid[None, :], (length, len(valid)))
  for lp in decoder_layers:
    y = _block(y, lp, cfg, causal, dec_bias, context, cross_allowed)
  y = _rmsnorm(y, p["decoder"]["final_norm"], cfg.layer_norm_eps)
  return _logits(y, p, cfg)


def reference_decoder_only(model, tokens, prefix=None):
  """decoder_only: causal, causal buckets. prefix_lm: positions with prefix = 1 also see each
  other in both directions; the targets stay causal; the bucket table is bidirectional."""
  cfg = model.cfg
  p = _params(model)
  length = len(tokens)
  allowed = np.tril(np.ones((length, length), bool))
  if prefix is not None:
    allowed = allowed | (prefix[:, None] & prefix[None, :])
  bias = _position_bias(p["decoder"]["position_bias"]["embedding"]["embedding"], length,
                        bidirectional=cfg.architecture == "prefix_lm")
  y = p["token_embed"]["embedding"][tokens]
  for lp in _unstack(p["decoder"]["layers"]["block"], cfg.num_layers).values():
    y = _block(y, lp, cfg, allowed, bias)
  return _logits(_rmsnorm(y, p["decoder"]["final_norm"], cfg.layer_norm_eps), p, cfg)


# Tests -----------------------------------------------------------------------------------------

ENCODER_LENGTH, DECODER_LENGTH = 16, 14


def _encoder_decoder_batch():
  rng = np.random.default_rng(0)
  encoder = np.zeros((2, ENCODER_LENGTH), np.int32)
  encoder[0, :14] = rng.integers(1, VOCAB, 14)  # different lengths, padding 0 at the end
  encoder[1, :9] = rng.integers(1, VOCAB, 9)
  decoder = rng.integers(1, VOCAB, (2, DECODER_LENGTH)).astype(np.int32)
  decoder[:, 0] = 0  # BOS is the padding id in T5
  decoder[1, 11:] = 0  # row 1: 11 real decoder positions, then padding
  return encoder, decoder, [DECODER_LENGTH, 11]


def test_the_test_inputs_reach_every_bucket():
  """With 8 buckets and max_distance 8, lengths 14..16 use the exact, log-spaced and clipped
  buckets of both tables, so a wrong bucket function cannot hide."""
  assert (set(_bucket_matrix(ENCODER_LENGTH, ENCODER_LENGTH, True).ravel())
          == set(range(BUCKETS)) - {BUCKETS // 2})  # distance 0 is in the lower half
  causal = _bucket_matrix(DECODER_LENGTH, DECODER_LENGTH, False)
  assert set(causal[np.tril_indices(DECODER_LENGTH)]) == set(range(BUCKETS))


def _check_encoder_decoder(model):
  encoder, decoder, decoder_lengths = _encoder_decoder_batch()
  logits = np.asarray(model({"encoder_input_tokens": jnp.asarray(encoder),
                             "decoder_input_tokens": jnp.asarray(decoder)}))
  assert logits.shape == (2, DECODER_LENGTH, VOCAB)
  for row, length in enumerate(decoder_lengths):
    expected = reference_encoder_decoder(model, encoder[row], decoder[row])
    np.testing.assert_allclose(logits[row, :length], expected[:length], **TOL,
                               err_msg=f"row {row}")
  return logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_decoder_matches_reference(variant):
  model = _model(variant)
  logits = _check_encoder_decoder(model)
  # the comparison is sharp: dropping the decoder's relative bias moves the logits far past
  # the tolerance
  table = model.decoder.position_bias.embedding.embedding
  table[...] = jnp.zeros_like(table[...])
  encoder, decoder, _ = _encoder_decoder_batch()
  moved = np.asarray(model({"encoder_input_tokens": jnp.asarray(encoder),
                            "decoder_input_tokens": jnp.asarray(decoder)}))
  assert np.abs(moved - logits).max() > 100 * TOL["atol"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("architecture", ["decoder_only", "prefix_lm"])
def test_decoder_only_and_prefix_lm_match_reference(variant, architecture):
  model = _model(variant, architecture, seed=1)
  rng = np.random.default_rng(1)
  length = 16
  tokens = rng.integers(1, VOCAB, (2, length)).astype(np.int32)
  tokens[:, 0] = 0
  prefix = np.zeros((2, length), np.int32)
  prefix[0, :6] = 1  # inputs (and the position reading the last input) see each other
  prefix[1, :10] = 1
  logits = np.asarray(model({"decoder_input_tokens": jnp.asarray(tokens),
                             "decoder_causal_attention": jnp.asarray(prefix)}))
  for row in range(2):
    expected = reference_decoder_only(
        model, tokens[row], prefix[row] > 0 if architecture == "prefix_lm" else None)
    np.testing.assert_allclose(logits[row], expected, **TOL, err_msg=f"row {row}")
  if architecture == "prefix_lm":  # the prefix really is bidirectional
    causal_only = reference_decoder_only(model, tokens[0], None)
    assert np.abs(causal_only[:6] - logits[0, :6]).max() > 100 * TOL["atol"]


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_encoder_decoder_shared_matches_reference_and_shares_weights(variant):
  model = _model(variant, "encoder_decoder_shared", seed=2)
  for name in SHARED:  # the very same stacked modules, not copies
    assert getattr(model.encoder.layers.block, name) is getattr(model.decoder.layers.block, name)
  _check_encoder_decoder(model)

  unshared = t5.T5(_config(variant), rngs=nnx.Rngs(0))
  p = nnx.to_pure_dict(nnx.state(unshared, nnx.Param))
  decoder_own = sum(_count(p["decoder"]["layers"]["block"][name]) for name in SHARED)
  cfg = unshared.cfg
  per_layer = (4 * cfg.d_model * cfg.num_heads * cfg.d_kv
               + (3 if cfg.mlp == "gated-gelu" else 2) * cfg.d_model * cfg.d_ff + 2 * cfg.d_model)
  assert decoder_own == cfg.num_layers * per_layer
  shared_count = _count(nnx.state(model, nnx.Param))
  assert shared_count == _count(p) - decoder_own
  assert shared_count == t5.param_count(model.cfg)
  assert _count(p) == t5.param_count(cfg)
