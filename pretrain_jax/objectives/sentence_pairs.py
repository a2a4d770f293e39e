"""Packing tokenised sentences into pretraining examples, in pure numpy.

* `next_sentence_instances`: BERT's sentence pairs for next-sentence prediction
  (Devlin et al. 2018, create_instances_from_document), with unbiased labels.
* `full_sentence_instances`: RoBERTa's FULL-SENTENCES packing (Liu et al. 2019).

Deterministic given the `np.random.Generator` passed in.
"""
from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import numpy as np

IS_NEXT, RANDOM_NEXT = 0, 1


def next_sentence_instances(document: Sequence, random_document: Sequence, rng: np.random.Generator,
                            *, max_length: int, cls_id: int, sep_id: int, short_seq_prob: float = 0.1
                            ) -> list[tuple[np.ndarray, np.ndarray, int]]:
  """BERT's create_instances_from_document: [(tokens int32 [n<=max_length], segment_ids int32 [n], nsp_label)].

  tokens = [CLS] A [SEP] B [SEP], segment ids 0 on "[CLS] A [SEP]" and 1 on "B [SEP]";
  label 0: B is the text that follows A in `document`; 1: B comes from `random_document`.

  Sentences accumulate into a chunk until it reaches the target length
  (max_length - 3, or with probability short_seq_prob a uniform int in
  [2, max_length - 3]; redrawn per instance so that ~short_seq_prob of the
  *instances* are short). A is the chunk's first a_end sentences. Differences
  from BERT's code, all to keep P(label = 1) = 1/2 exactly:
  * the label is a fair coin for every chunk, also a one-sentence chunk (BERT
    forces "random next" there); with label 0, B is the document's following
    sentence(s), filled up to the target;
  * whether an instance is made never depends on the label: a lone last
    sentence (no following text, so no label-0 B) makes no instance, hence a
    document with < 2 sentences makes none, and an empty `random_document`
    (no label-1 B possible) makes the whole document produce none.
  """
  if max_length < 5:
    raise ValueError(f"max_length must be >= 5 ([CLS] a [SEP] b [SEP]), got {max_length}")
  max_num_tokens = max_length - 3
  document = [s for s in map(_ids, document) if s.size]
  random_document = [s for s in map(_ids, random_document) if s.size]
  if not random_document:
    return []

  def draw_target():
    if rng.random() < short_seq_prob:
      return int(rng.integers(2, max_num_tokens + 1))
    return max_num_tokens

  instances = []
  chunk, length, target = [], 0, draw_target()
  i = 0
  while i < len(document):
    chunk.append(document[i])
    length += document[i].size
    i += 1
    if i < len(document) and length < target:
      continue
    if len(chunk) == 1 and i == len(document):
      break  # lone last sentence: no label-0 partner, so no instance either way
    label = RANDOM_NEXT if rng.random() < 0.5 else IS_NEXT
    a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
    a = np.concatenate(chunk[:a_end])
    if label == RANDOM_NEXT:
      start = int(rng.integers(len(random_document)))  # a random sentence of the random document
      b = np.concatenate(_take(random_document, start, target - a.size))
      i -= len(chunk) - a_end  # put the unused chunk sentences back
    elif a_end < len(chunk):
      b = np.concatenate(chunk[a_end:])
    else:  # one-sentence chunk: continue into the following sentence(s)
      following = _take(document, i, target - a.size)
      b = np.concatenate(following)
      i += len(following)
    a, b = _truncate_pair(a, b, max_num_tokens, rng)
    tokens = np.concatenate([[cls_id], a, [sep_id], b, [sep_id]]).astype(np.int32)
    segment_ids = np.concatenate([np.zeros(a.size + 2, np.int32), np.ones(b.size + 1, np.int32)])
    instances.append((tokens, segment_ids, label))
    chunk, length, target = [], 0, draw_target()
  return instances


def full_sentence_instances(documents: Iterable[Sequence], *, max_length: int, cls_id: int,
                            sep_id: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """RoBERTa FULL-SENTENCES: yields (tokens, segment_ids all 0), `[CLS] ... [SEP]`, <= max_length.

  Whole contiguous sentences are packed while they fit; packing crosses
  document boundaries with a [SEP] between the documents. A sentence longer
  than the budget (max_length - 2) is cut into budget-sized pieces, so no text
  is dropped. Nothing is padded.
  """
  budget = max_length - 2
  if budget < 1:
    raise ValueError(f"max_length must be >= 3 ([CLS] x [SEP]), got {max_length}")
  parts, used = [], 0
  for document in documents:
    new_document = True
    for sentence in map(_ids, document):
      for piece in (sentence[s:s + budget] for s in range(0, sentence.size, budget)):
        gap = int(new_document and used > 0)  # the [SEP] between two documents
        if used + gap + piece.size > budget:
          yield _pack(parts, cls_id, sep_id)
          parts, used, gap = [], 0, 0
        parts += [np.array([sep_id], np.int32)] * gap + [piece]
        used += gap + piece.size
        new_document = False
  if used:
    yield _pack(parts, cls_id, sep_id)


def _ids(sentence) -> np.ndarray:
  return np.asarray(sentence, np.int32).reshape(-1)


def _take(sentences, start, min_tokens):
  """The sentences from `start` on, stopping once they hold >= min_tokens tokens (at least one)."""
  taken, n = [], 0
  for s in sentences[start:]:
    taken.append(s)
    n += s.size
    if n >= min_tokens:
      break
  return taken


def truncated_lengths(len_a: int, len_b: int, max_tokens: int) -> tuple[int, int]:
  """Lengths left by BERT's truncate_seq_pair: drop a token from the longer side (B on ties) until they fit."""
  excess = len_a + len_b - max_tokens
  if excess <= 0:
    return len_a, len_b
  if len_a - excess >= len_b:
    return len_a - excess, len_b
  if len_b - excess >= len_a:
    return len_a, len_b - excess
  return (max_tokens + 1) // 2, max_tokens // 2


def _truncate_pair(a, b, max_tokens, rng):
  """BERT's truncate_seq_pair: each dropped token comes off the front or back with probability 1/2."""
  out = []
  for x, keep in zip((a, b), truncated_lengths(a.size, b.size, max_tokens)):
    front = int(rng.binomial(x.size - keep, 0.5))
    out.append(x[front:front + keep])
  return out


def _pack(parts, cls_id, sep_id):
  tokens = np.concatenate([[cls_id], *parts, [sep_id]]).astype(np.int32)
  return tokens, np.zeros(tokens.size, np.int32)
