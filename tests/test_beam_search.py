"""Beam search: beam 1 is greedy decoding, a wide enough beam is exhaustive search, and EOS ends
a hypothesis whose score is then the log-probability of its tokens and EOS."""

import itertools

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretrain_jax.inference import decoding
from pretrain_jax.inference.beam_search import beam_search, beam_search_all
from pretrain_jax.models import gpt


def _model(vocab_size, seed=0, spread=0.3):
  """A tiny random decoder; `spread` perturbs every parameter so next-token distributions are
  far from uniform (no near-ties for float rounding to break differently)."""
  gin.clear_config()  # GptConfig is gin-configurable: no binding from another test may leak in
  cfg = gpt.GptConfig(vocab_size=vocab_size, hidden=32, num_layers=2, num_heads=4, mlp_dim=48,
                      max_positions=64, dropout_rate=0.0)
  model = gpt.Gpt(cfg, rngs=nnx.Rngs(seed))
  leaves, treedef = jax.tree.flatten(nnx.state(model, nnx.Param))
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  leaves = [x + spread * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(treedef, leaves))
  return model


def test_beam_of_one_is_greedy_for_a_ragged_batch():
  model = _model(61, seed=1, spread=0.1)
  rng = np.random.default_rng(0)
  prompts = [rng.integers(1, 61, size=n).tolist() for n in (7, 1, 4)]
  greedy = decoding.generate(model, prompts, 10)
  assert beam_search(model, prompts, 10, beam_size=1, alpha=0.6) == greedy
  eos = greedy[0][4]  # with EOS and a length penalty it is still greedy, stopping at EOS
  assert (beam_search(model, prompts, 10, beam_size=1, alpha=0.6, eos_id=eos)
          == decoding.generate(model, prompts, 10, eos_id=eos))


def test_wide_beam_is_exhaustive_search():
  vocab, steps, prompt = 7, 3, [3, 1, 4, 1]
  model = _model(vocab, seed=0)  # a model where greedy's continuation is not the best
  # every continuation's log-probability by full forward passes
  continuations = np.array(list(itertools.product(range(vocab), repeat=steps)), np.int32)
  tokens = np.concatenate([np.tile(prompt, (len(continuations), 1)), continuations], axis=1)
  log_probs = jax.nn.log_softmax(model(jnp.asarray(tokens)).astype(jnp.float32), axis=-1)
  targets = jnp.asarray(tokens[:, len(prompt):])[..., None]
  totals = np.asarray(jnp.take_along_axis(log_probs[:, len(prompt) - 1:-1], targets, axis=-1)
                      ).sum(axis=(1, 2))
  table = {tuple(c): t for c, t in zip(continuations.tolist(), totals)}
  best = np.argsort(-totals)
  assert totals[best[0]] - totals[best[1]] > 1e-3  # a clear winner: no float ties

  everything, = beam_search_all(model, [prompt], steps, beam_size=vocab ** steps, alpha=0.0)
  assert len(everything) == vocab ** steps  # every sequence kept, best first
  assert everything[0].tokens == continuations[best[0]].tolist()
  np.testing.assert_allclose([h.log_prob for h in everything],
                             [table[tuple(h.tokens)] for h in everything], atol=1e-4)
  assert sorted(tuple(h.tokens) for h in everything) == sorted(table)

  greedy, = decoding.generate(model, [prompt], steps)
  four, = beam_search_all(model, [prompt], steps, beam_size=4, alpha=0.0)
  assert len(four) == 4 and four[0].log_prob == max(h.log_prob for h in four)
  np.testing.assert_allclose(four[0].log_prob, table[tuple(four[0].tokens)], atol=1e-4)
  # not a theorem for every model (greedy's prefix can fall out of the beam), but true here,
  # and strictly: this model's greedy path is beaten
  assert four[0].log_prob >= table[tuple(greedy)] + 1e-3


def test_eos_ends_hypotheses_and_rows_search_as_alone():
  vocab, steps = 7, 6
  model = _model(vocab, seed=5)
  prompts = [[1, 2, 3, 4, 5], [6, 2]]
  eos = 1  # chosen so each row's best hypothesis ends in EOS after one or two real tokens
  batched = beam_search_all(model, prompts, steps, beam_size=3, alpha=0.6, eos_id=eos)
  for prompt, hypotheses in zip(prompts, batched):
    alone, = beam_search_all(model, [prompt], steps, beam_size=3, alpha=0.6, eos_id=eos)
    assert [h.tokens for h in hypotheses] == [h.tokens for h in alone]
    np.testing.assert_allclose([h.score for h in hypotheses], [h.score for h in alone],
                               atol=1e-5)
    assert [h.score for h in hypotheses] == sorted((h.score for h in hypotheses), reverse=True)
    # a finished hypothesis's probability includes ending here
    scored = decoding.score(model, [prompt] * len(hypotheses),
                            [h.tokens + [eos] * h.finished for h in hypotheses])
    np.testing.assert_allclose([h.log_prob for h in hypotheses], scored, atol=1e-4)
    for h in hypotheses:
      assert eos not in h.tokens
      assert h.finished or len(h.tokens) == steps
      n = len(h.tokens) + h.finished
      np.testing.assert_allclose(h.score, h.log_prob / ((5 + n) / 6) ** 0.6, rtol=1e-5)
  assert all(hs[0].finished and hs[0].tokens for hs in batched)
  assert any(not h.finished for hs in batched for h in hs)  # alive ones ran to the horizon
  assert beam_search(model, prompts, steps, beam_size=3, alpha=0.6, eos_id=eos) == [
      hs[0].tokens for hs in batched]
