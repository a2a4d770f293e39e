"""T5's denoising objectives (objectives/denoising.py) run through tf.data, checked against the
definitions: exact noise/span counts, sentinel order, exact reconstruction, determinism, the
distribution of span lengths, and random_spans_helper's lengths."""
import math

import numpy as np
import pytest
import seqio
import tensorflow as tf

from pretrain_jax.data import vocabularies
from pretrain_jax.errors import UserError
from pretrain_jax.objectives import denoising

VOCAB = vocabularies.bbc_sentencepiece()  # 8000 pieces + 100 extra ids
V = VOCAB.vocab_size
FEATURES = {"inputs": seqio.Feature(VOCAB, add_eos=True),
            "targets": seqio.Feature(VOCAB, add_eos=True)}
SEQUENCE_LENGTH = {"inputs": 512, "targets": 114}
FIRST_SENTINEL = 8000  # ids >= this are sentinels; the text below only uses [3, 8000)

_rng = np.random.default_rng(0)
VARIED = [_rng.integers(3, 8000, n).astype(np.int32)
          for n in np.concatenate([np.arange(2, 12), _rng.integers(2, 601, 1190)])]
T5_RAW = 568
LONG = [_rng.integers(3, 8000, T5_RAW).astype(np.int32) for _ in range(2000)]


def _run(preprocessor, sequences, seed=0, sequence_length=SEQUENCE_LENGTH,
         features=FEATURES, **kwargs):
  """All sequences through ONE tf.data pipeline; returns [(inputs, targets)] in order."""
  ragged = tf.RaggedTensor.from_row_lengths(np.concatenate(sequences),
                                            [len(s) for s in sequences])
  ds = tf.data.Dataset.from_tensor_slices({"targets": ragged})
  with seqio.map_seed_manager(seed):
    ds = preprocessor(ds, sequence_length=sequence_length, output_features=features, **kwargs)
  return [(ex["inputs"], ex["targets"]) for ex in ds.as_numpy_iterator()]


def _expected_counts(length, density=0.15, mean=3.0):
  """Independent numpy statement of the definition (float64, round half to even)."""
  noise = int(np.clip(np.round(length * density), 1, length - 1))
  spans = min(max(1, int(np.round(noise / mean))), length - noise)
  return noise, spans


def _runs(tokens):
  """Lengths of the runs between sentinels: ([run before each sentinel], tail)."""
  positions = np.flatnonzero(tokens >= FIRST_SENTINEL)
  bounds = np.concatenate([[-1], positions])
  return np.diff(bounds) - 1, len(tokens) - 1 - (positions[-1] if len(positions) else -1)


def _check_sentinels(inputs, targets, vocab_size=V):
  sentinels_in = inputs[inputs >= FIRST_SENTINEL]
  sentinels_out = targets[targets >= FIRST_SENTINEL]
  np.testing.assert_array_equal(sentinels_in, vocab_size - 1 - np.arange(len(sentinels_in)))
  np.testing.assert_array_equal(sentinels_out, sentinels_in)
  return len(sentinels_in)


@pytest.fixture(scope="module")
def varied():
  return _run(denoising.span_corruption, VARIED)


@pytest.fixture(scope="module")
def long_run():
  return _run(denoising.span_corruption, LONG)


def test_span_corruption_follows_the_definition(varied):
  assert len(varied) == len(VARIED) >= 1000
  total_noise = total_tokens = 0
  for original, (inputs, targets) in zip(VARIED, varied):
    assert inputs.dtype == targets.dtype == np.int32
    num_noise, num_spans = _expected_counts(len(original))
    assert _check_sentinels(inputs, targets) == num_spans
    assert len(targets) - num_spans == num_noise
    assert len(inputs) == len(original) - num_noise + num_spans
    # interleaved non-noise, noise, ..., noise: every sentinel follows >= 1 real token and
    # every target span has >= 1 token
    nonnoise_runs, tail = _runs(inputs)
    assert nonnoise_runs.min() >= 1 and tail == 0 and inputs[0] < FIRST_SENTINEL
    noise_runs, last = _runs(targets)
    assert targets[0] == V - 1 and (noise_runs[1:] >= 1).all() and last >= 1
    np.testing.assert_array_equal(denoising.reconstruct(inputs, targets, V), original)
    total_noise += num_noise
    total_tokens += len(original)
  # |clip(round(L·d)) - L·d| <= 1 per example, so the overall fraction is within n/total
  assert abs(total_noise / total_tokens - 0.15) <= len(VARIED) / total_tokens
  assert abs(total_noise / total_tokens - 0.15) < 0.005


def _composition_pmf(n, s, k):
  """P(a given part = k) for a uniform composition of n into s positive parts."""
  return math.comb(n - k - 1, s - 2) / math.comb(n - 1, s - 1)


def test_span_lengths_are_uniform_compositions(long_run):
  num_noise, num_spans = _expected_counts(T5_RAW)
  assert (num_noise, num_spans) == (85, 28)
  noise = np.stack([_runs(t)[0][1:].tolist() + [_runs(t)[1]] for _, t in long_run])
  nonnoise = np.stack([_runs(i)[0] for i, _ in long_run])
  assert noise.shape == nonnoise.shape == (len(LONG), num_spans)
  np.testing.assert_array_equal(noise.sum(1), num_noise)
  np.testing.assert_array_equal(nonnoise.sum(1), T5_RAW - num_noise)
  # The mean span length n/s is fixed by the counts: 85/28 ≈ 3.04 (the rounding of s moves
  # it at most μ/(2s) ≈ 0.05 from μ = 3).
  assert noise.mean() == pytest.approx(85 / 28) and abs(noise.mean() - 3) < 0.06
  for lengths, n in ((noise, num_noise), (nonnoise, T5_RAW - num_noise)):
    # Each part's length has the composition pmf; 56k parts give a standard error
    # <= 0.0021 on each frequency; 5 SE (parts of one example are dependent, but
    # negatively, which only lowers the variance of the frequency).
    parts = lengths.size
    for k in range(1, 6):
      p = _composition_pmf(n, num_spans, k)
      assert abs((lengths == k).mean() - p) < 5 * math.sqrt(p * (1 - p) / parts), (n, k)
    # Exchangeable parts: the first and last span have mean n/s too (2000 draws, 5 SE).
    for column in (0, -1):
      se = lengths[:, column].std() / math.sqrt(len(LONG))
      assert abs(lengths[:, column].mean() - n / num_spans) < 5 * se
  # Noise is spread over the chunk: away from the edges each position is noise ≈ 85/568.
  masks = np.stack([np.repeat(np.tile([False, True], num_spans),
                              np.stack([a, b], 1).ravel()) for a, b in zip(nonnoise, noise)])
  middle = masks[:, 100:468].mean()
  assert abs(middle - num_noise / T5_RAW) < 0.01  # ~740k cells, SE ≈ 0.0004 (+ correlation)


def test_reconstruct_long(long_run):
  for original, (inputs, targets) in zip(LONG, long_run):
    np.testing.assert_array_equal(denoising.reconstruct(inputs, targets, V), original)


def test_same_seed_same_outputs_different_seed_different_masks(varied):
  again = _run(denoising.span_corruption, VARIED, seed=0)
  other = _run(denoising.span_corruption, VARIED, seed=1)
  differ = 0
  for original, (i0, t0), (i1, t1), (i2, t2) in zip(VARIED, varied, again, other):
    np.testing.assert_array_equal(i0, i1)
    np.testing.assert_array_equal(t0, t1)
    if len(original) >= 100:  # >= 5 spans: a repeated mask has probability < 1e-6
      differ += not np.array_equal(i0, i2)
      assert not np.array_equal(i0, i2)
  assert differ > 900
  # Each example gets its own seed: identical chunks in one dataset get different masks.
  copies = _run(denoising.span_corruption, [LONG[0]] * 20)
  assert len({tuple(inputs) for inputs, _ in copies}) == 20


def test_mask_function_seed_and_edge_cases():
  mask = lambda n, seed: denoising.random_spans_noise_mask(n, seed=seed).numpy()
  np.testing.assert_array_equal(mask(300, [1, 2]), mask(300, [1, 2]))
  assert not np.array_equal(mask(300, [1, 2]), mask(300, [1, 3]))
  assert mask(300, [1, 2]).sum() == 45 and mask(300, [1, 2]).dtype == bool
  assert mask(0, [1, 2]).shape == (0,)
  np.testing.assert_array_equal(mask(1, [1, 2]), [False])  # L = 1: no noise
  np.testing.assert_array_equal(mask(2, [1, 2]), [False, True])
  # num_spans > num_nonnoise is clipped: 0.9 of 10 with span length 1 → 1 non-noise token
  dense = denoising.random_spans_noise_mask(10, 0.9, 1.0, seed=[0, 0]).numpy()
  np.testing.assert_array_equal(dense, [False] + [True] * 9)
  assert denoising.noise_span_counts(10, 0.9, 1.0) == (9, 1)
  # Chunks of fewer than 2 tokens are passed through with empty targets.
  out = _run(denoising.span_corruption, [np.array([7], np.int32), np.array([8, 9], np.int32)])
  np.testing.assert_array_equal(out[0][0], [7])
  assert out[0][1].size == 0
  np.testing.assert_array_equal(out[1][0], [8, V - 1])
  np.testing.assert_array_equal(out[1][1], [V - 1, 9])


def test_random_spans_helper_lengths():
  assert denoising.random_spans_helper(512) == (568, 114)
  inputs_lengths = [3, 4, 5, 10, 37, 64, 100, 128, 256, 511, 512, 513, 1024]
  raws = [denoising.random_spans_helper(n) for n in inputs_lengths]
  sequences = [np.full(raw + extra, 5, np.int32) for raw, _ in raws for extra in (0, 1)]
  out = _run(denoising.span_corruption, sequences, sequence_length=None)
  for k, (n, (raw, targets_length)) in enumerate(zip(inputs_lengths, raws)):
    (inputs, targets), (inputs_plus, _) = out[2 * k], out[2 * k + 1]
    assert len(inputs) + 1 <= n < len(inputs_plus) + 1, (n, raw)  # +1: EOS
    assert len(targets) + 1 == targets_length
    noise, spans = _expected_counts(raw)
    assert targets_length == noise + spans + 1
    if n >= 10:
      assert len(inputs) + 1 == n  # at ordinary lengths inputs fill up exactly
  # Two extra tokens per span (e.g. sentinel + separator) make a shorter raw chunk.
  raw2, _ = denoising.random_spans_helper(512, extra_tokens_per_span_inputs=2)
  noise, spans = _expected_counts(raw2)
  assert raw2 < 568 and raw2 - noise + 2 * spans + 1 <= 512
  assert (raw2 + 1) - _expected_counts(raw2 + 1)[0] + 2 * _expected_counts(raw2 + 1)[1] + 1 > 512


def test_errors_name_the_bad_value():
  with pytest.raises(UserError, match="noise_density=0"):
    denoising.random_spans_helper(512, noise_density=0.0)
  with pytest.raises(UserError, match="mean_noise_span_length=0.5"):
    denoising.random_spans_noise_mask(10, 0.15, 0.5, seed=[0, 0])
  with pytest.raises(UserError, match="inputs_length=2"):
    denoising.random_spans_helper(2)
  with pytest.raises(UserError, match="noise_density=1.5"):
    denoising.iid_noise(None, None, FEATURES, noise_density=1.5)
  plain = seqio.PassThroughVocabulary(100)
  no_sentinels = {k: seqio.Feature(plain) for k in ("inputs", "targets")}
  with pytest.raises(UserError, match="extra_ids"):
    denoising.span_corruption(None, SEQUENCE_LENGTH, no_sentinels)
  with pytest.raises(UserError, match="output_features"):
    denoising.span_corruption(None, SEQUENCE_LENGTH, {"targets": FEATURES["targets"]})
  with pytest.raises(UserError, match="inputs length 4000 .* only 100 sentinels"):
    denoising.span_corruption(None, {"inputs": 4000, "targets": 800}, FEATURES)
  # A chunk too long for the sentinels (no sequence_length to check statically) fails loudly.
  with pytest.raises(tf.errors.InvalidArgumentError, match="more noise spans"):
    _run(denoising.span_corruption, [np.full(2400, 5, np.int32)], sequence_length=None)


def test_seqio_task_seed_and_eos():
  """Through a seqio.Task: the task seed drives the maps, EOS comes from add_eos."""
  def source(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_tensor_slices(
        {"targets": tf.RaggedTensor.from_row_lengths(np.concatenate(LONG[:8]), [T5_RAW] * 8)})
  name = "test_span_corruption_task"
  seqio.TaskRegistry.remove(name)
  task = seqio.TaskRegistry.add(
      name, seqio.FunctionDataSource(source, splits=["train"]),
      preprocessors=[denoising.span_corruption, seqio.preprocessors.append_eos_after_trim],
      output_features=FEATURES)
  try:
    get = lambda seed: list(task.get_dataset(SEQUENCE_LENGTH, "train", shuffle=False,
                                             seed=seed).as_numpy_iterator())
    a, b, c = get(3), get(3), get(4)
  finally:
    seqio.TaskRegistry.remove(name)
  for original, x, y, z in zip(LONG, a, b, c):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
    assert not np.array_equal(x["inputs"], z["inputs"])
    assert len(x["inputs"]) == 512 and len(x["targets"]) == 114
    assert x["inputs"][-1] == x["targets"][-1] == VOCAB.eos_id
    np.testing.assert_array_equal(
        denoising.reconstruct(x["inputs"], x["targets"], V, eos_id=VOCAB.eos_id), original)


def test_iid_noise():
  out = _run(denoising.iid_noise, LONG)
  spans = []
  noise = 0
  for original, (inputs, targets) in zip(LONG, out):
    spans.append(_check_sentinels(inputs, targets))
    noise += len(targets) - spans[-1]
    np.testing.assert_array_equal(denoising.reconstruct(inputs, targets, V), original)
    assert (_runs(inputs)[0][1:] >= 1).all()  # consecutive noise is one span
  tokens = len(LONG) * T5_RAW
  # 1.14M Bernoulli(0.15) draws: SE = 0.00034; 6 SE.
  assert abs(noise / tokens - 0.15) < 0.002
  # Runs of an i.i.d. mask: E[#runs] = d + (L-1)·d(1-d) ≈ 72.3 (not ≈ 28 as random spans),
  # mean run length 1/(1-d) ≈ 1.18. 2000 examples with SD ≈ 7.5: SE ≈ 0.17.
  expected_runs = 0.15 + (T5_RAW - 1) * 0.15 * 0.85
  assert abs(np.mean(spans) - expected_runs) < 1.0
  assert abs(noise / sum(spans) - 1 / 0.85) < 0.01
  again = _run(denoising.iid_noise, LONG[:50])
  assert all(np.array_equal(x[0], y[0]) for x, y in zip(out, again))
  assert not any(np.array_equal(x[0], y[0])
                 for x, y in zip(out, _run(denoising.iid_noise, LONG[:50], seed=9)))


def test_iid_noise_keeps_at_most_extra_ids_spans():
  vocab = vocabularies.bbc_sentencepiece(extra_ids=5)
  features = {k: seqio.Feature(vocab) for k in ("inputs", "targets")}
  out = _run(denoising.iid_noise, LONG[:50], features=features, noise_density=0.5)
  for original, (inputs, targets) in zip(LONG, out):
    assert _check_sentinels(inputs, targets, vocab.vocab_size) == 5  # ~140 runs, only the first 5 are noise
    assert targets[0] == vocab.vocab_size - 1 == 8004
    np.testing.assert_array_equal(denoising.reconstruct(inputs, targets, vocab.vocab_size),
                                  original)


def test_prefix_lm():
  out = _run(denoising.prefix_lm, VARIED)
  for original, (inputs, targets) in zip(VARIED, out):
    assert len(inputs) >= 1 and len(targets) >= 1
    np.testing.assert_array_equal(np.concatenate([inputs, targets]), original)
  assert [len(i) for i, _ in out] == [len(i) for i, _ in _run(denoising.prefix_lm, VARIED)]
  # The split point is uniform on 1..9 for L = 10: chi² with 8 dof < 31.8 (p = 1e-4).
  tens = _run(denoising.prefix_lm, [VARIED[8]] * 1800)
  assert len(VARIED[8]) == 10
  counts = np.bincount([len(i) for i, _ in tens], minlength=10)
  assert counts[0] == 0 and counts.sum() == 1800
  assert (((counts[1:] - 200) ** 2) / 200).sum() < 31.8
  one = _run(denoising.prefix_lm, [np.array([7], np.int32)])
  np.testing.assert_array_equal(one[0][0], [7])
  assert one[0][1].size == 0


def test_deshuffle():
  out = _run(denoising.deshuffle, VARIED)
  for original, (inputs, targets) in zip(VARIED, out):
    np.testing.assert_array_equal(targets, original)
    np.testing.assert_array_equal(np.sort(inputs), np.sort(original))
    if len(original) >= 20:
      assert not np.array_equal(inputs, original)
  again = _run(denoising.deshuffle, VARIED[:100])
  assert all(np.array_equal(x[0], y[0]) for x, y in zip(out, again))
  # All 6 orders of 3 distinct tokens equally likely: chi² with 5 dof < 25.7 (p = 1e-4).
  three = np.array([10, 20, 30], np.int32)
  orders = [tuple(i) for i, _ in _run(denoising.deshuffle, [three] * 1800)]
  counts = np.array([orders.count(p) for p in set(orders)])
  assert len(counts) == 6 and (((counts - 300) ** 2) / 300).sum() < 25.7
