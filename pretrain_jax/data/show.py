"""`show-data`: examples exactly as the model will see them (after the feature converter)."""

from __future__ import annotations

import json

import numpy as np
import seqio

from pretrain_jax import config
from pretrain_jax.data import pipeline
from pretrain_jax.errors import UserError


def _converter():
  converter = config.bound("train.feature_converter")
  if converter is None:
    from pretrain_jax.objectives.masked_lm import MaskedLmFeatureConverter
    converter = MaskedLmFeatureConverter()
  return converter


def _vocabulary(task: str):
  provider = seqio.get_mixture_or_task(task)
  features = provider.output_features
  return features[next(iter(features))].vocabulary


def examples(task: str, split: str, num: int, sequence_length: int, seed: int = 0):
  """The first `num` converted examples of `task` (numpy dicts), unbatched."""
  lengths = {"inputs": sequence_length, "targets": sequence_length}
  ds = pipeline._dataset(task, lengths, _converter(), split, seed, shuffle=False)  # pylint: disable=protected-access
  return list(ds.take(num).as_numpy_iterator())


def _row(example: dict, vocab) -> dict:
  """Features trimmed to the non-padding length, plus decoded text for id features."""
  length = int(np.sum(example["targets"] != vocab.pad_id)) if "targets" in example else None
  row = {}
  for name, value in example.items():
    value = np.asarray(value)
    if value.ndim == 0:
      row[name] = value.item()
      continue
    value = value[:length]
    row[name] = value.tolist()
    if name in ("inputs", "targets"):
      row[f"{name}_text"] = " ".join(_token(vocab, int(i)) for i in value)
  return row


def _token(vocab, token_id: int) -> str:
  tokens = getattr(vocab, "tokens", None)
  return tokens[token_id] if tokens is not None else vocab.decode([token_id])


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
