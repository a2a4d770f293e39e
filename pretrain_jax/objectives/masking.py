"""Masked-LM corruption (BERT, whole-word BERT, SpanBERT) in pure numpy.

Called per example from `tf.numpy_function`, so everything here is deterministic
given the `np.random.Generator` passed in, and vectorised where it matters.

Notation: L tokens; the *candidates* are the positions whose id is not special;
k = min(max_predictions, max(1, round(rate * #candidates))) positions are
selected (Devlin et al. 2018, create_pretraining_data); each selected position
becomes [MASK] / a random id / itself with probability 0.8 / 0.1 / 0.1 and
carries loss weight 1.
"""
from __future__ import annotations

import numpy as np

UNITS = ("token", "whole_word", "span")


def mask_tokens(token_ids, rng: np.random.Generator, *, special_ids, vocab_size: int,
                mask_id: int, mask_rate: float = 0.15, max_predictions: int = 20,
                unit: str = "token", word_start=None, span_p: float = 0.2,
                max_span_length: int = 10, mask_prob: float = 0.8, random_prob: float = 0.1,
                random_ids=None) -> tuple[np.ndarray, np.ndarray]:
  """Returns (inputs int32 [L], loss_weights float32 [L]); targets are `token_ids`.

  unit: "token" (BERT), "whole_word" (BERT whole-word masking) or "span"
    (SpanBERT; span lengths in words, see `span_length_probs`).
  word_start: bool [vocab_size], True for ids that begin a word (False for "##"
    pieces); required for "whole_word" and "span". A candidate that follows a
    non-candidate (e.g. [CLS]/[SEP]) always begins a word.
  random_ids: ids a "random" replacement is drawn from (uniformly); default all
    non-special ids in [0, vocab_size).
  Loss weights are 1 on EVERY selected position (also the random/unchanged
  ones), as in BERT.
  """
  if unit not in UNITS:
    raise ValueError(f"unknown masking unit {unit!r}; valid units: {UNITS}")
  if unit != "token" and word_start is None:
    raise ValueError(f"unit={unit!r} needs word_start (bool [vocab_size])")
  if not 0.0 <= mask_rate <= 1.0:
    raise ValueError(f"mask_rate must be in [0, 1], got {mask_rate}")
  if mask_prob < 0 or random_prob < 0 or mask_prob + random_prob > 1:
    raise ValueError(f"need mask_prob, random_prob >= 0 and sum <= 1, got {mask_prob}, {random_prob}")
  if not 0.0 < span_p <= 1.0 or max_span_length < 1:
    raise ValueError(f"need 0 < span_p <= 1 and max_span_length >= 1, got {span_p}, {max_span_length}")

  token_ids = np.asarray(token_ids, np.int32)
  if isinstance(special_ids, (set, frozenset)):
    special_ids = sorted(special_ids)
  special = np.asarray(special_ids, np.int64).reshape(-1)
  candidates = np.flatnonzero(~np.isin(token_ids, special))
  n = candidates.size
  k = min(max_predictions, max(1, int(round(n * mask_rate)))) if n else 0

  if unit == "token":
    chosen = np.zeros(n, bool)
    chosen[rng.choice(n, k, replace=False)] = True
  else:
    word_of, word_len = _words(token_ids, candidates, np.asarray(word_start, bool))
    if unit == "whole_word":
      chosen_words = _whole_words(word_len, k, rng)
    else:
      chosen_words, _ = _spans(word_len, k, rng, span_p, max_span_length)
    chosen = chosen_words[word_of]
  selected = candidates[chosen]

  # 80 / 10 / 10: one uniform draw per selected position decides its fate.
  u = rng.random(selected.size)
  is_mask = u < mask_prob
  is_random = (u >= mask_prob) & (u < mask_prob + random_prob)
  inputs = token_ids.copy()
  inputs[selected[is_mask]] = mask_id
  inputs[selected[is_random]] = _random_tokens(rng, int(is_random.sum()), special, vocab_size,
                                               random_ids)
  loss_weights = np.zeros(token_ids.shape, np.float32)
  loss_weights[selected] = 1.0
  return inputs, loss_weights


def _words(token_ids, candidates, word_start):
  """Splits candidates into words: (word index of each candidate, length of each word)."""
  starts = word_start[token_ids[candidates]]
  if candidates.size:
    starts[0] = True
    starts[1:] |= np.diff(candidates) != 1  # a piece after [SEP]/[CLS] starts a word
  word_of = np.cumsum(starts) - 1
  word_len = np.bincount(word_of, minlength=int(starts.sum()))
  return word_of, word_len


def _whole_words(word_len, k, rng):
  """BERT whole-word masking: visit words in random order, add each one that keeps total <= k."""
  order = rng.permutation(word_len.size)
  chosen = np.zeros(word_len.size, bool)
  # Words before the first overflow are all taken (vectorised); then skip/continue greedily.
  fit = np.searchsorted(np.cumsum(word_len[order]), k, side="right")
  chosen[order[:fit]] = True
  total = int(word_len[order[:fit]].sum())
  for w in order[fit + 1:]:
    if total == k:
      break
    if total + word_len[w] <= k:
      chosen[w] = True
      total += int(word_len[w])
  return chosen


def span_length_probs(p: float, max_len: int) -> np.ndarray:
  """P(span = l words), l = 1..max_len: Geometric(p) truncated to max_len and renormalised.

  This is what gives SpanBERT's quoted mean of 3.8 words for p=0.2, max 10;
  clipping (min(G, 10)) instead would give a mean of 4.46.
  """
  probs = p * (1 - p) ** np.arange(max_len)
  return probs / probs.sum()


def _spans(word_len, k, rng, p, max_len):
  """SpanBERT span selection; returns (chosen words bool [W], sampled span lengths).

  Repeatedly: l ~ span_length_probs, a uniformly random start word, and the l
  consecutive words from there (cut at the sequence end). Already chosen words
  are not counted twice. A span that would overshoot the budget k is trimmed to
  its longest whole-word prefix that fits (possibly nothing, then we resample),
  so exactly k tokens are selected unless no unchosen word fits the remaining
  budget, in which case we stop just below k.
  """
  num_words = word_len.size
  cdf = np.cumsum(span_length_probs(p, max_len))
  chosen = np.zeros(num_words, bool)
  total, lengths = 0, []
  while total < k and np.any(~chosen & (word_len <= k - total)):
    length = 1 + int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
    start = int(rng.integers(num_words))
    span = np.arange(start, min(start + length, num_words))
    new = span[~chosen[span]]
    new = new[np.cumsum(word_len[new]) <= k - total]
    chosen[new] = True
    total += int(word_len[new].sum())
    lengths.append(length)
  return chosen, lengths


def _random_tokens(rng, size, special, vocab_size, random_ids):
  """Uniform over random_ids, or over the non-special ids of [0, vocab_size)."""
  if random_ids is not None:
    random_ids = np.asarray(random_ids, np.int32)
    return random_ids[rng.integers(random_ids.size, size=size)]
  special = np.unique(special[(special >= 0) & (special < vocab_size)])
  if vocab_size <= special.size:
    raise ValueError("no non-special ids to draw random replacements from")
  r = rng.integers(vocab_size - special.size, size=size)
  # The r-th non-special id is r + #{specials s : s - (its rank) <= r}.
  return (r + np.searchsorted(special - np.arange(special.size), r, side="right")).astype(np.int32)
