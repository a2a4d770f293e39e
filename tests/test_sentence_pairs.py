"""BERT next-sentence pairs and RoBERTa FULL-SENTENCES packing on synthetic documents.

Every token value in the corpus is unique (its global position + OFFSET), so the
origin of any token — document, sentence, place in the text — can be read back.
"""
import numpy as np
import pytest

from pretrain_jax.objectives.sentence_pairs import (full_sentence_instances, next_sentence_instances,
                                                    truncated_lengths)

CLS, SEP, OFFSET = 1, 2, 10


def _corpus(num_docs, seed, max_sentences=12, max_sentence_len=40):
  """Documents of 1..max_sentences sentences of 1..max_sentence_len tokens, plus token -> origin maps."""
  rng = np.random.default_rng(seed)
  docs, doc_of, sentence_start, sentence_end, next_value = [], [], [], [], OFFSET
  for d in range(num_docs):
    doc = []
    for n in rng.integers(1, max_sentence_len + 1, size=rng.integers(1, max_sentences + 1)):
      doc.append(np.arange(next_value, next_value + n, dtype=np.int32))
      next_value += n
      doc_of += [d] * n
      sentence_start += [True] + [False] * (n - 1)
      sentence_end += [False] * (n - 1) + [True]
    docs.append(doc)
  return docs, np.array(doc_of), np.array(sentence_start), np.array(sentence_end)


DOCS, DOC_OF, STARTS, ENDS = _corpus(12_000, seed=0)
DOC_LAST = {d: doc[-1][-1] for d, doc in enumerate(DOCS)}


def _instances(max_length=128, short_seq_prob=0.1, seed=0, docs=DOCS):
  rng = np.random.default_rng(seed)
  out = []
  for d, doc in enumerate(docs):
    other = docs[(d + 1 + rng.integers(len(docs) - 1)) % len(docs)]
    out += [(d, *x) for x in next_sentence_instances(doc, other, rng, max_length=max_length,
                                                      cls_id=CLS, sep_id=SEP,
                                                      short_seq_prob=short_seq_prob)]
  return out


@pytest.fixture(scope="module")
def instances():
  return _instances()


def _split(tokens):
  seps = np.flatnonzero(tokens == SEP)
  return tokens[1:seps[0]], tokens[seps[0] + 1:seps[1]]


def _consecutive(x):
  return x.size > 0 and (np.diff(x) == 1).all()


def test_format(instances):
  assert len(instances) >= 20_000
  for _, tokens, segment_ids, label in instances:
    assert tokens.dtype == segment_ids.dtype == np.int32 and tokens.size == segment_ids.size <= 128
    assert tokens[0] == CLS and tokens[-1] == SEP and (tokens == SEP).sum() == 2
    first_sep = np.flatnonzero(tokens == SEP)[0]
    assert 1 < first_sep < tokens.size - 2  # A and B are non-empty
    np.testing.assert_array_equal(segment_ids, np.arange(tokens.size) > first_sep)
    assert label in (0, 1)


def test_nsp_labels_unbiased(instances):
  labels = np.array([x[3] for x in instances])
  # n >= 20k: the standard error is <= 0.0035, so 0.01 is ~3 of them
  assert abs(labels.mean() - 0.5) < 0.01, labels.mean()


def test_nsp_labels_unbiased_on_short_documents():
  """Two-sentence documents are where BERT's code forces "random next"."""
  docs = _corpus(20_000, seed=1, max_sentences=2, max_sentence_len=200)[0]
  labels = np.array([x[3] for x in _instances(docs=docs)])
  assert len(labels) > 8_000
  assert abs(labels.mean() - 0.5) < 4 * 0.5 / np.sqrt(len(labels)), labels.mean()


def test_a_and_b_come_from_the_right_text(instances):
  untruncated = 0
  for d, tokens, _, label in instances:
    a, b = _split(tokens)
    a, b = a - OFFSET, b - OFFSET
    assert _consecutive(a) and _consecutive(b)  # truncation only trims the ends of A and B
    assert (DOC_OF[a] == d).all()
    if label == 0:
      assert (DOC_OF[b] == d).all() and b[0] > a[-1]
    else:
      assert (DOC_OF[b] != d).all()
    if tokens.size < 128:  # no truncation happened (it leaves exactly 128 tokens)
      untruncated += 1
      assert STARTS[a[0]] and ENDS[a[-1]] and STARTS[b[0]] and ENDS[b[-1]]
      if label == 0:
        assert b[0] == a[-1] + 1  # A then B is the document's text, split at a sentence
  assert untruncated > 2_000


def test_label_0_untruncated_with_large_max_length():
  docs = DOCS[:3000]
  for d, tokens, _, label in _instances(max_length=100_000, docs=docs):
    if label == 0:
      a, b = _split(tokens)
      ab = np.concatenate([a, b]) - OFFSET
      assert _consecutive(ab) and STARTS[ab[0]] and ENDS[ab[-1]] and (DOC_OF[ab] == d).all()


def test_short_seq_prob():
  """Label-0 instances away from the document end reach max_length unless their target was short."""
  docs = _corpus(300, seed=3, max_sentences=300)[0]  # long documents: few instances near an end
  last = {d: doc[-1][-1] for d, doc in enumerate(docs)}

  def short_fraction(short_seq_prob):
    lengths = np.array([t.size for d, t, _, label in _instances(short_seq_prob=short_seq_prob, docs=docs)
                        if label == 0 and t[-2] != last[d]])
    assert lengths.size > 4000
    return (lengths < 128).mean()

  assert short_fraction(0.0) == 0
  # A short target (uniform in [2, 125]) stays below 125 tokens unless its last sentence overshoots
  # (~8 %), so expect ~0.092; the standard error on ~4.5k instances is ~0.0043.
  assert 0.075 < short_fraction(0.1) < 0.11


def test_degenerate_documents():
  rng = np.random.default_rng(0)
  kw = dict(max_length=64, cls_id=CLS, sep_id=SEP)
  one = [np.arange(10, 20)]
  two = [np.arange(10, 20), np.arange(20, 30)]
  assert next_sentence_instances(one, two, rng, **kw) == []
  assert next_sentence_instances(two, [], rng, **kw) == []
  assert len(next_sentence_instances(two, one, rng, **kw)) == 1


def test_deterministic():
  a, b, c = (_instances(seed=s, docs=DOCS[:200]) for s in (3, 3, 4))
  assert len(a) == len(b) and all((x[1] == y[1]).all() and x[3] == y[3] for x, y in zip(a, b))
  assert len(a) != len(c) or any(x[1].size != y[1].size or (x[1] != y[1]).any() for x, y in zip(a, c))


def test_truncated_lengths_match_bert_loop():
  rng = np.random.default_rng(0)
  for la, lb, m in rng.integers(1, 60, size=(5000, 3)):
    if m < 2:
      continue
    x, y = la, lb
    while x + y > m:
      if x > y:
        x -= 1
      else:
        y -= 1
    assert truncated_lengths(la, lb, m) == (x, y)


FS_DOCS, FS_DOC_OF, FS_STARTS, _ = _corpus(2000, seed=2, max_sentence_len=100)
FS_DOCS[5] = []  # an empty document leaves no trace
_lengths = np.diff(np.flatnonzero(np.append(FS_STARTS, True)))
FS_SENTENCE_LEN = np.repeat(_lengths, _lengths)  # length of the sentence each token is in


@pytest.mark.parametrize("max_length", [16, 64, 512])
def test_full_sentences(max_length):
  out = list(full_sentence_instances(iter(FS_DOCS), max_length=max_length, cls_id=CLS, sep_id=SEP))
  text = []
  for tokens, segment_ids in out:
    assert tokens.dtype == np.int32 and tokens.size <= max_length
    assert tokens[0] == CLS and tokens[-1] == SEP and tokens[1] != SEP and tokens[-2] != SEP
    np.testing.assert_array_equal(segment_ids, 0)
    body = tokens[1:-1]
    words = body[body != SEP] - OFFSET
    # inner [SEP]s are exactly the document boundaries
    sep_between = np.cumsum(body == SEP)[body != SEP]
    np.testing.assert_array_equal(np.diff(sep_between), np.diff(FS_DOC_OF[words]) != 0)
    # an instance starts at a sentence start unless the sentence is longer than the budget
    assert FS_STARTS[words[0]] or FS_SENTENCE_LEN[words[0]] > max_length - 2
    text.append(words)
  expected = np.concatenate([s for doc in FS_DOCS for s in doc]) - OFFSET
  np.testing.assert_array_equal(np.concatenate(text), expected)
  if max_length == 512:
    assert np.mean([t.size for t, _ in out[:-1]]) > 450  # packs tightly
