"""T5's unsupervised objectives (Raffel et al. 2020, §3.3) as SeqIO preprocessors.

Every preprocessor reads {"targets": int32 [L]}, one tokenized chunk of text without EOS,
and writes int32 "inputs" and "targets" (other features pass through). The tasks cut the
chunks to the raw length L the objective needs (`random_spans_helper`); the Features'
add_eos appends EOS afterwards. Sentinels count down from the top of the vocabulary: the
k-th noise span (k = 0, 1, ...) is `vocab_size - 1 - k`, i.e. <extra_id_k> of a seqio
SentencePieceVocabulary, so the vocabulary needs extra_ids.

  span_corruption  noise = `random_spans_noise_mask`; each noise span becomes ONE sentinel
                   in the inputs; the targets are, per span, its sentinel then its tokens:
                     x₁ x₂ x₃ x₄ x₅ x₆ x₇  (spans x₂x₃ and x₆)
                     inputs  x₁ <0> x₄ x₅ <1> x₇      targets <0> x₂ x₃ <1> x₆
                   Unlike the paper's figure we do NOT append a final sentinel: the targets
                   end with the EOS of add_eos.
  iid_noise        the same with an i.i.d. mask: each token is noise with probability
                   `noise_density`; a run of consecutive noise tokens is one span.
  prefix_lm        split at a uniform point s ∈ [1, L-1]: inputs x₁…xₛ, targets xₛ₊₁…x_L.
  deshuffle        inputs = a uniform random permutation of the tokens, targets = the tokens.

Random spans, for length L, density d and mean span length μ (`noise_span_counts`):
  num_noise  = clip(round(L·d), 1, L-1)
  num_spans  = min(max(1, round(num_noise / μ)), L - num_noise)   (≤ one span per non-noise
               token, so that every noise span follows a non-noise one)
  num_noise and L - num_noise are each split into num_spans positive lengths, uniformly over
  all such compositions, and interleaved non-noise, noise, non-noise, noise, …
  round() is round-half-to-even, in float64, identically in Python and TF.
A chunk with L < 2 cannot be split into non-noise and noise: it gets no noise (inputs = the
tokens, targets empty) in every objective.

Randomness: each preprocessor is a `seqio.map_over_dataset(num_seeds=1)` map, so every
example gets its own stateless TF seed pair, drawn from SeqIO's map-seed manager (the
task's seed → deterministic, a new epoch's seed → new noise). All random ops are TF
stateless ops of that pair, so the maps are graph-only (no numpy_function, no GIL).
"""

from __future__ import annotations

import gin
import numpy as np
import seqio
import tensorflow as tf

from pretrain_jax.errors import UserError


# Counting and the noise masks ------------------------------------------------------------------

def _check_noise(noise_density: float, mean_noise_span_length: float | None = None) -> None:
  if not 0 < noise_density < 1:
    raise UserError(f"noise_density={noise_density}; it must lie in (0, 1)")
  if mean_noise_span_length is not None and not mean_noise_span_length >= 1:
    raise UserError(f"mean_noise_span_length={mean_noise_span_length}; it must be >= 1")


def noise_span_counts(length: int, noise_density: float = 0.15,
                      mean_noise_span_length: float = 3.0) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) of `random_spans_noise_mask` for a chunk of `length`."""
  if length < 2:
    return 0, 0
  num_noise = min(max(round(length * noise_density), 1), length - 1)
  num_spans = min(max(1, round(num_noise / mean_noise_span_length)), length - num_noise)
  return num_noise, num_spans


def _noise_span_counts_tf(length_: tf.Tensor, noise_density: float,
                          mean_noise_span_length: float) -> tuple[tf.Tensor, tf.Tensor]:
  """`noise_span_counts` for a scalar int32 length ≥ 2 in the graph (same float64 rounding)."""
  num_noise = tf.cast(tf.round(tf.cast(length_, tf.float64) * noise_density), tf.int32)
  num_noise = tf.minimum(tf.maximum(num_noise, 1), length_ - 1)
  num_spans = tf.cast(tf.round(tf.cast(num_noise, tf.float64) / mean_noise_span_length),
                      tf.int32)
  num_spans = tf.minimum(tf.maximum(num_spans, 1), length_ - num_noise)
  return num_noise, num_spans


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor,
                         seed: tf.Tensor) -> tf.Tensor:
  """Lengths int32 [num_segments], each ≥ 1, summing to num_items (1 ≤ num_segments ≤ num_items).

  Uniform over all compositions: the num_segments - 1 cuts are a uniform random subset of
  the num_items - 1 gaps between items (stars and bars).
  """
  gaps = tf.random.experimental.stateless_shuffle(tf.range(1, num_items), seed)
  cuts = tf.sort(gaps[:num_segments - 1])
  bounds = tf.concat([[0], cuts, [num_items]], axis=0)
  return bounds[1:] - bounds[:-1]


def random_spans_noise_mask(length, noise_density: float = 0.15,
                            mean_noise_span_length: float = 3.0, *, seed) -> tf.Tensor:
  """bool [length]: random noise spans, interleaved after non-noise ones (module docstring).

  seed: a stateless TF seed, shape [2] int32/int64 (the same seed gives the same mask).
  length < 2: all False (no noise). Works eagerly and inside tf.data maps.
  """
  _check_noise(noise_density, mean_noise_span_length)
  length_ = tf.cast(length, tf.int32)
  seed_noise, seed_nonnoise = tf.unstack(
      tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2))

  def spans():
    num_noise, num_spans = _noise_span_counts_tf(length_, noise_density, mean_noise_span_length)
    noise_N = _random_segmentation(num_noise, num_spans, seed_noise)
    nonnoise_N = _random_segmentation(length_ - num_noise, num_spans, seed_nonnoise)
    run_lengths_2N = tf.reshape(tf.stack([nonnoise_N, noise_N], axis=1), [-1])
    return tf.repeat(tf.tile([False, True], [num_spans]), run_lengths_2N)

  mask_L = tf.cond(length_ >= 2, spans, lambda: tf.zeros([length_], tf.bool))
  return tf.ensure_shape(mask_L, [None] if isinstance(length, tf.Tensor) else [length])


def iid_noise_mask(length, noise_density: float = 0.15, *, seed) -> tf.Tensor:
  """bool [length]: each position is noise independently with probability noise_density.

  length < 2: all False, as for the random-spans mask.
  """
  _check_noise(noise_density)
  length_ = tf.cast(length, tf.int32)
  mask_L = tf.random.stateless_uniform([length_], tf.cast(seed, tf.int64)) < noise_density
  return tf.logical_and(mask_L, length_ >= 2)


# Noise → (inputs, targets) -------------------------------------------------------------------

def _span_starts(mask_L: tf.Tensor) -> tf.Tensor:
  """bool [L]: noise positions whose predecessor is not noise."""
  previous_L = tf.concat([[False], mask_L[:-1]], axis=0)
  return tf.logical_and(mask_L, tf.logical_not(previous_L))


def _keep_spans(mask_L: tf.Tensor, max_spans: int) -> tf.Tensor:
  """The mask with every noise span after the first `max_spans` made non-noise."""
  span_index_L = tf.cumsum(tf.cast(_span_starts(mask_L), tf.int32))
  return tf.logical_and(mask_L, span_index_L <= max_spans)


def noise_spans_to_sentinels(tokens_L: tf.Tensor, mask_L: tf.Tensor,
                             vocab_size: int) -> tuple[tf.Tensor, tf.Tensor]:
  """(inputs, targets) int32: noise span k → sentinel vocab_size-1-k in the inputs; the
  targets list each span's sentinel followed by its tokens."""
  tokens_L = tf.cast(tokens_L, tf.int32)
  starts_L = _span_starts(mask_L)
  sentinels_L = vocab_size - tf.cumsum(tf.cast(starts_L, tf.int32))  # k-th start: vocab_size-1-k
  # Each position emits [its span's sentinel if it starts a span, its token if kept].
  emitted_2L = tf.reshape(tf.stack([sentinels_L, tokens_L], axis=1), [-1])

  def emit(keep_token_L):
    keep_2L = tf.reshape(tf.stack([starts_L, keep_token_L], axis=1), [-1])
    return tf.boolean_mask(emitted_2L, keep_2L)

  return emit(tf.logical_not(mask_L)), emit(mask_L)


def reconstruct(inputs, targets, vocab_size: int, eos_id: int | None = None) -> np.ndarray:
  """The original tokens (int32 numpy): each sentinel of `inputs` replaced by its span from
  `targets`. Sentinels are recognised by their order (vocab_size-1, vocab_size-2, …), so the
  text itself must not contain sentinel ids. eos_id: drop a trailing EOS from both first.
  """
  inputs, targets = (np.asarray(x).tolist() for x in (inputs, targets))
  if eos_id is not None:
    inputs, targets = (x[:-1] if x and x[-1] == eos_id else x for x in (inputs, targets))
  spans: list[list[int]] = []
  for token in targets:
    if token == vocab_size - 1 - len(spans):
      spans.append([])
    elif not spans:
      raise ValueError(f"targets must start with sentinel {vocab_size - 1}, got {token}")
    else:
      spans[-1].append(token)
  tokens: list[int] = []
  used = 0
  for token in inputs:
    if used < len(spans) and token == vocab_size - 1 - used:
      tokens += spans[used]
      used += 1
    else:
      tokens.append(token)
  if used != len(spans):
    raise ValueError(f"targets have {len(spans)} spans but inputs only {used} sentinels")
  return np.asarray(tokens, np.int32)


# Raw lengths --------------------------------------------------------------------------------

def random_spans_helper(inputs_length: int, noise_density: float = 0.15,
                        mean_noise_span_length: float = 3.0,
                        extra_tokens_per_span_inputs: int = 1,
                        extra_tokens_per_span_targets: int = 1) -> tuple[int, int]:
  """(raw tokens_length to read, targets_length) for span corruption into `inputs_length`.

  With (n, s) = noise_span_counts(L) a raw chunk of L tokens gives
    inputs  = L - n + s·extra_tokens_per_span_inputs + 1  (+1: EOS)
    targets = n + s·extra_tokens_per_span_targets + 1
  and tokens_length is the largest L ≥ 2 whose inputs ≤ inputs_length (inputs is
  non-decreasing in L, so bisection finds it). T5: 512 → (568, 114).
  """
  _check_noise(noise_density, mean_noise_span_length)
  if extra_tokens_per_span_inputs < 0 or extra_tokens_per_span_targets < 0:
    raise UserError(f"extra_tokens_per_span_inputs={extra_tokens_per_span_inputs} and "
                    f"extra_tokens_per_span_targets={extra_tokens_per_span_targets} must be >= 0")

  def lengths(raw: int) -> tuple[int, int]:
    num_noise, num_spans = noise_span_counts(raw, noise_density, mean_noise_span_length)
    return (raw - num_noise + num_spans * extra_tokens_per_span_inputs + 1,
            num_noise + num_spans * extra_tokens_per_span_targets + 1)

  if lengths(2)[0] > inputs_length:
    raise UserError(f"inputs_length={inputs_length} is too short for span corruption "
                    f"(at least {lengths(2)[0]})")
  low, high = 2, 4  # invariant: lengths(low) fits; find a high that does not
  while lengths(high)[0] <= inputs_length:
    low, high = high, 2 * high
  while high - low > 1:
    middle = (low + high) // 2
    low, high = (middle, high) if lengths(middle)[0] <= inputs_length else (low, middle)
  return low, lengths(low)[1]


# SeqIO preprocessors ------------------------------------------------------------------------

def _vocab_with_sentinels(output_features, objective: str):
  if "inputs" not in output_features or "targets" not in output_features:
    raise UserError(f"{objective} writes 'inputs' and 'targets': the task's output_features "
                    f"name {sorted(output_features)}")
  vocab = output_features["targets"].vocabulary
  if not getattr(vocab, "extra_ids", 0):
    raise UserError(f"{objective} needs sentinel ids: the targets vocabulary has no extra_ids "
                    f"(e.g. seqio.SentencePieceVocabulary(model_file, extra_ids=100))")
  return vocab


@gin.configurable
def span_corruption(dataset, sequence_length, output_features, noise_density: float = 0.15,
                    mean_noise_span_length: float = 3.0):
  """T5's objective: random noise spans → one sentinel each in the inputs; targets list them.

  Read chunks of random_spans_helper(inputs_length)[0] tokens. A chunk needing more spans
  than the vocabulary has extra_ids fails (statically when sequence_length["inputs"] says so).
  """
  _check_noise(noise_density, mean_noise_span_length)
  vocab = _vocab_with_sentinels(output_features, "span_corruption")
  if sequence_length and sequence_length.get("inputs"):
    raw, _ = random_spans_helper(sequence_length["inputs"], noise_density, mean_noise_span_length)
    _, num_spans = noise_span_counts(raw, noise_density, mean_noise_span_length)
    if num_spans > vocab.extra_ids:
      raise UserError(f"span_corruption: inputs length {sequence_length['inputs']} (raw {raw} "
                      f"tokens) makes {num_spans} noise spans but the vocabulary has only "
                      f"{vocab.extra_ids} sentinels (extra_ids)")

  @seqio.map_over_dataset(num_seeds=1)
  def fn(ex, seed):
    tokens_L = ex["targets"]
    mask_L = random_spans_noise_mask(tf.size(tokens_L), noise_density, mean_noise_span_length,
                                     seed=tf.convert_to_tensor(seed))
    num_spans = tf.reduce_sum(tf.cast(_span_starts(mask_L), tf.int32))
    check = tf.debugging.assert_less_equal(
        num_spans, vocab.extra_ids,
        message=f"span_corruption: a chunk has more noise spans than the {vocab.extra_ids} "
                f"sentinels; read chunks of random_spans_helper(inputs_length)[0] tokens")
    with tf.control_dependencies([check]):
      inputs, targets = noise_spans_to_sentinels(tokens_L, mask_L, vocab.vocab_size)
    return {**ex, "inputs": inputs, "targets": targets}

  return fn(dataset)


@gin.configurable
def iid_noise(dataset, sequence_length, output_features, noise_density: float = 0.15):
  """The paper's i.i.d. baseline: span corruption with an i.i.d. mask.

  A mask with more runs than the vocabulary has sentinels keeps only its first extra_ids runs
  as noise (rare: 568 tokens at 0.15 give 72 ± 8 runs for 100 sentinels).
  """
  del sequence_length
  _check_noise(noise_density)
  vocab = _vocab_with_sentinels(output_features, "iid_noise")

  @seqio.map_over_dataset(num_seeds=1)
  def fn(ex, seed):
    tokens_L = ex["targets"]
    mask_L = iid_noise_mask(tf.size(tokens_L), noise_density, seed=tf.convert_to_tensor(seed))
    mask_L = _keep_spans(mask_L, vocab.extra_ids)
    inputs, targets = noise_spans_to_sentinels(tokens_L, mask_L, vocab.vocab_size)
    return {**ex, "inputs": inputs, "targets": targets}

  return fn(dataset)


def _map_with_seed(dataset, fn):
  """{"targets": tokens} → {"inputs", "targets"} = fn(tokens int32, this example's int64 seed)."""

  @seqio.map_over_dataset(num_seeds=1)
  def apply(ex, seed):
    inputs, targets = fn(tf.cast(ex["targets"], tf.int32),
                         tf.cast(tf.convert_to_tensor(seed), tf.int64))
    return {**ex, "inputs": inputs, "targets": targets}

  return apply(dataset)


@gin.configurable
def prefix_lm(dataset, sequence_length, output_features):
  """Prefix LM: inputs = a prefix of uniform length in [1, L-1], targets = the rest."""
  del sequence_length, output_features

  def split_at_random(tokens_L, seed):
    length = tf.size(tokens_L)
    split = tf.random.stateless_uniform([], seed, minval=1, maxval=tf.maximum(length, 2),
                                        dtype=tf.int32)
    split = tf.where(length >= 2, split, length)  # L < 2: inputs = the tokens, no targets
    return tokens_L[:split], tokens_L[split:]

  return _map_with_seed(dataset, split_at_random)


@gin.configurable
def deshuffle(dataset, sequence_length, output_features):
  """Deshuffling: inputs = the tokens in a uniform random order, targets = the tokens."""
  del sequence_length, output_features
  return _map_with_seed(dataset, lambda tokens_L, seed: (
      tf.random.experimental.stateless_shuffle(tokens_L, seed), tokens_L))
