"""Statistics of the masked-LM corruption on ~136k candidate tokens (BERT, whole-word, SpanBERT)."""
import numpy as np
import pytest

from pretrain_jax.objectives import masking
from pretrain_jax.objectives.masking import mask_tokens

PAD, UNK, CLS, SEP, MASK = range(5)
SPECIAL = (PAD, UNK, CLS, SEP, MASK)
VOCAB = 1000
WORD_START = np.arange(VOCAB) % 3 != 0  # ids divisible by 3 are "##" continuation pieces
LENGTH = 256


def _example(rng):
  """[CLS] A [SEP] B [SEP] PAD..., with 20..253 content tokens."""
  n = int(rng.integers(20, LENGTH - 2))
  body = rng.integers(len(SPECIAL), VOCAB, size=n)
  a = int(rng.integers(1, n))
  tokens = np.concatenate([[CLS], body[:a], [SEP], body[a:], [SEP]])
  return np.pad(tokens, (0, LENGTH - tokens.size)).astype(np.int32)


_rng = np.random.default_rng(1234)
TOKENS = np.stack([_example(_rng) for _ in range(1000)])
CANDIDATE = ~np.isin(TOKENS, SPECIAL)
NUM_CANDIDATES = CANDIDATE.sum(1)
assert NUM_CANDIDATES.sum() >= 100_000


def _budget(n, rate=0.15, cap=10**6):
  return np.minimum(cap, np.maximum(1, np.round(n * rate))).astype(int)


def _run(unit, seed=0, tokens=TOKENS, **kw):
  kw = dict(special_ids=SPECIAL, vocab_size=VOCAB, mask_id=MASK, max_predictions=10**6,
            unit=unit, word_start=WORD_START) | kw
  rng = np.random.default_rng(seed)
  out = [mask_tokens(t, rng, **kw) for t in tokens]
  return np.stack([o[0] for o in out]), np.stack([o[1] for o in out])


def _words(tokens):
  """Independent reference: lists of position arrays, one per word, of one example."""
  words = []
  for pos, tok in enumerate(tokens):
    if tok in SPECIAL:
      continue
    if WORD_START[tok] or not words or words[-1][-1] != pos - 1:
      words.append([pos])
    else:
      words[-1].append(pos)
  return words


@pytest.fixture(scope="module")
def token_run():
  return _run("token")


def test_token_rate_is_exactly_budget(token_run):
  inputs, weights = token_run
  selected = weights > 0
  np.testing.assert_array_equal(selected.sum(1), _budget(NUM_CANDIDATES))
  assert abs(selected.sum() / NUM_CANDIDATES.sum() - 0.15) < 0.005
  assert not (selected & ~CANDIDATE).any()  # special tokens are never selected
  assert set(np.unique(weights)) == {0.0, 1.0} and weights.dtype == np.float32
  np.testing.assert_array_equal(inputs[~selected], TOKENS[~selected])  # nothing else changes


def test_80_10_10_split(token_run):
  inputs, weights = token_run
  selected = weights > 0
  got, orig = inputs[selected], TOKENS[selected]
  is_mask, is_same = got == MASK, got == orig
  is_random = ~is_mask & ~is_same  # a random draw equal to the original (p=1/995) counts as "same"
  n = selected.sum()  # ~20k: 1 point is >= 3.7 standard errors for every fraction
  assert n > 20_000
  assert abs(is_mask.mean() - 0.8) < 0.01
  assert abs(is_random.mean() - 0.1) < 0.01
  assert abs(is_same.mean() - 0.1) < 0.01
  assert not np.isin(got[is_random], SPECIAL).any()  # replacements are real words
  assert np.unique(got[is_random]).size > 800  # ~2k draws cover ~86 % of the 995 ids


def test_random_ids_and_probabilities():
  inputs, weights = _run("token", tokens=TOKENS[:200], random_ids=[7, 8], mask_prob=0.0,
                         random_prob=1.0)
  assert set(np.unique(inputs[weights > 0])) <= {7, 8}
  inputs, weights = _run("token", tokens=TOKENS[:200], mask_prob=0.0, random_prob=0.0)
  np.testing.assert_array_equal(inputs, TOKENS[:200])  # all selected kept, still weighted
  assert weights.sum() == _budget(NUM_CANDIDATES[:200]).sum()


@pytest.mark.parametrize("unit", masking.UNITS)
def test_max_predictions_cap(unit):
  _, weights = _run(unit, tokens=TOKENS[:300], max_predictions=20)
  budget = _budget(NUM_CANDIDATES[:300], cap=20)
  assert (budget == 20).sum() > 100  # the cap binds on many examples
  assert (weights.sum(1) <= budget).all()
  np.testing.assert_array_equal(weights.sum(1)[budget == 20], 20)


def test_whole_word():
  _, weights = _run("whole_word")
  selected = weights > 0
  assert abs(selected.sum() / NUM_CANDIDATES.sum() - 0.15) < 0.005
  assert (selected.sum(1) <= _budget(NUM_CANDIDATES)).all()
  assert not (selected & ~CANDIDATE).any()
  partial = 0
  for tokens, sel in zip(TOKENS[:300], selected[:300]):
    partial += sum(0 < sel[w].sum() < len(w) for w in _words(tokens))
  assert partial == 0


@pytest.fixture(scope="module")
def span_run():
  return _run("span")


def test_span_rate_and_whole_words(span_run):
  _, weights = span_run
  selected = weights > 0
  budget = _budget(NUM_CANDIDATES)
  assert (selected.sum(1) <= budget).all()
  assert (selected.sum(1) == budget).mean() > 0.99  # exact whenever some word still fits
  assert abs(selected.sum() / NUM_CANDIDATES.sum() - 0.15) < 0.005
  assert not (selected & ~CANDIDATE).any()
  for tokens, sel in zip(TOKENS[:300], selected[:300]):
    assert all(sel[w].all() or not sel[w].any() for w in _words(tokens))


def test_span_length_distribution():
  probs = masking.span_length_probs(0.2, 10)
  lengths = np.arange(1, 11)
  mean = (lengths * probs).sum()
  assert abs(mean - 3.8) < 0.01  # SpanBERT's quoted mean
  std = np.sqrt((lengths**2 * probs).sum() - mean**2)
  rng = np.random.default_rng(0)
  sampled = []
  for t in TOKENS:  # the lengths the selection loop actually drew
    _, word_len = masking._words(t, np.flatnonzero(~np.isin(t, SPECIAL)), WORD_START)
    sampled += masking._spans(word_len, _budget(word_len.sum()), rng, 0.2, 10)[1]
  sampled = np.array(sampled)
  assert sampled.size > 5000 and sampled.min() >= 1 and sampled.max() <= 10
  assert abs(sampled.mean() - mean) < 4 * std / np.sqrt(sampled.size)  # ~0.13
  np.testing.assert_allclose(np.bincount(sampled, minlength=11)[1:] / sampled.size, probs, atol=0.01)


def test_realised_span_lengths():
  """Runs of masked one-token words in sparse masking are the sampled spans (rare merges / trims)."""
  tokens = np.arange(4000, dtype=np.int32) % (VOCAB - len(SPECIAL)) + len(SPECIAL)
  rng = np.random.default_rng(0)
  runs = []
  for _ in range(300):
    _, w = mask_tokens(tokens, rng, special_ids=SPECIAL, vocab_size=VOCAB, mask_id=MASK,
                       mask_rate=0.01, max_predictions=10**6, unit="span",
                       word_start=np.ones(VOCAB, bool))
    edges = np.diff(np.concatenate([[0], w, [0]]))
    runs += list(np.flatnonzero(edges < 0) - np.flatnonzero(edges > 0))
  # Last-span trimming pulls the mean down ~0.2, merging pushes it up a little.
  assert 3.4 < np.mean(runs) < 4.0, np.mean(runs)


@pytest.mark.parametrize("unit", masking.UNITS)
def test_deterministic(unit):
  a = _run(unit, seed=5, tokens=TOKENS[:50])
  b = _run(unit, seed=5, tokens=TOKENS[:50])
  c = _run(unit, seed=6, tokens=TOKENS[:50])
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[1], c[1])


def test_no_candidates():
  tokens = np.array([CLS, SEP, SEP, PAD, PAD], np.int32)
  inputs, weights = mask_tokens(tokens, np.random.default_rng(0), special_ids=SPECIAL,
                                vocab_size=VOCAB, mask_id=MASK)
  np.testing.assert_array_equal(inputs, tokens)
  assert weights.sum() == 0


def test_validation():
  kw = dict(special_ids=SPECIAL, vocab_size=VOCAB, mask_id=MASK)
  with pytest.raises(ValueError, match="'bogus'.*whole_word"):
    mask_tokens(TOKENS[0], np.random.default_rng(0), unit="bogus", **kw)
  for unit in ("whole_word", "span"):
    with pytest.raises(ValueError, match="word_start"):
      mask_tokens(TOKENS[0], np.random.default_rng(0), unit=unit, **kw)
  with pytest.raises(ValueError):
    mask_tokens(TOKENS[0], np.random.default_rng(0), mask_prob=0.9, random_prob=0.2, **kw)
