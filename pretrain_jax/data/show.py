"""`show-data`: examples exactly as the model will see them (after the feature converter)."""

from __future__ import annotations

import json

import numpy as np
import seqio

from pretrain_jax import config
from pretrain_jax.data import pipeline, tasks
from pretrain_jax.errors import UserError


def _converter(task: str):
  """gin's train.feature_converter when a config binds one, else the task's own."""
  converter = config.bound("train.feature_converter")
  return tasks.feature_converter(task) if converter is None else converter


def _vocabulary(task: str):
  provider = seqio.get_mixture_or_task(task)
  features = provider.output_features
  return features[next(iter(features))].vocabulary


def examples(task: str, split: str, num: int, sequence_length: int, seed: int = 0):
  """The first `num` converted examples of `task` (numpy dicts), unbatched."""
  lengths = pipeline.feature_lengths(sequence_length)
  ds = pipeline._dataset(task, lengths, _converter(task), split, seed, shuffle=False)  # pylint: disable=protected-access
  return list(ds.take(num).as_numpy_iterator())


TOKEN_FEATURES = ("inputs", "targets", "tokens", "input_ids", "decoder_input_tokens",
                  "decoder_target_tokens", "encoder_input_tokens")


def _length_of(example: dict, name: str, pad_id: int) -> int | None:
  """Non-padding length of the feature group `name` belongs to (encoder_*, decoder_*, rest)."""
  group = name.split("_")[0] if name.startswith(("encoder_", "decoder_")) else None
  candidates = {"encoder": ("encoder_input_tokens",),
                "decoder": ("decoder_target_tokens",)}.get(group, ("targets", "tokens", "inputs", "input_ids"))
  for ref in candidates:
    if ref in example:
      nonpad = np.flatnonzero(np.asarray(example[ref]) != pad_id)
      return int(nonpad[-1]) + 1 if nonpad.size else 0
  return None


def _row(example: dict, vocab) -> dict:
  """Features trimmed to the non-padding length, plus decoded text for token features; for a
  denoising example, the original text rebuilt from its inputs and targets."""
  row = {}
  for name, value in example.items():
    value = np.asarray(value)
    if value.ndim == 0:
      row[name] = value.item()
      continue
    value = value[:_length_of(example, name, vocab.pad_id)]
    row[name] = value.tolist()
    if name in TOKEN_FEATURES:
      row[f"{name}_text"] = " ".join(_token(vocab, int(i)) for i in value)
  original = _original_text(row, vocab)
  if original is not None:
    row["original_text"] = original
  return row


def _original_text(row: dict, vocab) -> str | None:
  """Puts each packed example's targets back at its sentinels (span corruption, i.i.d. noise)."""
  extra = getattr(vocab, "extra_ids", 0)
  inputs, targets = row.get("encoder_input_tokens"), row.get("decoder_target_tokens")
  if not extra or inputs is None or targets is None:
    return None
  if not any(i >= vocab.vocab_size - extra for i in inputs):
    return None
  from pretrain_jax.objectives import denoising  # pylint: disable=import-outside-toplevel
  in_segments = np.asarray(row.get("encoder_segment_ids", [1] * len(inputs)))
  out_segments = np.asarray(row.get("decoder_segment_ids", [1] * len(targets)))
  texts = []
  for segment in sorted(set(in_segments.tolist()) - {0}):
    tokens = denoising.reconstruct(np.asarray(inputs)[in_segments == segment],
                                   np.asarray(targets)[out_segments == segment],
                                   vocab.vocab_size, eos_id=vocab.eos_id)
    texts.append(vocab.decode(tokens.tolist()))
  return " ‖ ".join(texts)


def _token(vocab, token_id: int) -> str:
  """The token's own spelling: a WordPiece, a SentencePiece piece (▁ marks a word start)."""
  tokens = getattr(vocab, "tokens", None)
  if tokens is not None:
    return tokens[token_id]
  pieces = getattr(getattr(vocab, "tokenizer", None), "id_to_piece", None)
  if pieces is not None and token_id < vocab.vocab_size - getattr(vocab, "extra_ids", 0):
    return pieces(token_id)
  return vocab.decode([token_id])


def main(task: str | None, split: str, num: int, as_json: bool, list_tasks: bool,
         sequence_length: int | None) -> None:
  if list_tasks:
    for name in sorted(seqio.TaskRegistry.names()):
      print(f"task     {name}")
    for name in sorted(seqio.MixtureRegistry.names()):
      print(f"mixture  {name}")
    return
  task = task or config.bound("train.task")
  if not task:
    raise UserError("show-data needs --task NAME (see show-data --list)")
  length = sequence_length or config.bound("train.sequence_length") or 128
  rows = examples(task, split, num, length)  # checks the task and split first
  vocab = _vocabulary(task)
  for i, example in enumerate(rows):
    row = _row(example, vocab)
    if as_json:
      print(json.dumps(row))
      continue
    print(f"── example {i} " + "─" * 60)
    for name, value in row.items():
      print(f"{name:>14}: {value}")
