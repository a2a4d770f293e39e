"""Host input pipeline: SeqIO datasets → numpy batches → global, sharded jax.Arrays.

Epoch e is the task shuffled and masked with seed + e, so the data position is just
(epoch, batch): a resumed run rebuilds epoch e and skips the batches it already trained on,
and sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import seqio
import tensorflow as tf

from pretrain_jax.errors import UserError


def _dataset(task: str, feature_lengths: dict, converter, split: str, seed: int | None,
             shuffle: bool):
  if task not in seqio.TaskRegistry.names() and task not in seqio.MixtureRegistry.names():
    known = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
    raise UserError(f"unknown task or mixture {task!r}; registered: {', '.join(known)}")
  shard = seqio.ShardInfo(jax.process_index(), jax.process_count())
  return seqio.get_dataset(task, feature_lengths, converter, dataset_split=split,
                           shuffle=shuffle, num_epochs=1, shard_info=shard, seed=seed,
                           verbose=False)


def _host_options() -> tf.data.Options:
  """Keep tf.data to a small thread pool: it shares the host's cores with the XLA step."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = max(1, (os.cpu_count() or 2) // 4)
  options.threading.max_intra_op_parallelism = 1
  return options


def host_batch_size(global_batch: int) -> int:
  if global_batch % jax.process_count():
    raise UserError(f"batch size {global_batch} is not divisible by the {jax.process_count()} "
                    "hosts")
  return global_batch // jax.process_count()


class TrainBatches:
  """An endless, resumable iterator of host batches (dicts of numpy arrays)."""

  def __init__(self, task: str, feature_lengths: dict, converter, batch_size: int, seed: int,
               split: str = "train", position: dict | None = None):
    self.task, self.feature_lengths, self.converter = task, feature_lengths, converter
    self.split, self.seed = split, seed
    self.batch_size = host_batch_size(batch_size)
    self.position = dict(position or {"epoch": 0, "batch": 0})
    self._it = self._epoch_iterator(skip=self.position["batch"])

  def _epoch_iterator(self, skip: int):
    ds = _dataset(self.task, self.feature_lengths, self.converter, self.split,
                  self.seed + self.position["epoch"], shuffle=True)
    ds = ds.batch(self.batch_size, drop_remainder=True).skip(skip).prefetch(2)
    return ds.with_options(_host_options()).as_numpy_iterator()

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      batch = next(self._it)
    except StopIteration:
      if self.position["batch"] == 0:
        raise UserError(
            f"task {self.task!r} split {self.split!r} yields no full batch of "
            f"{self.batch_size} examples at lengths {self.feature_lengths}: the corpus is "
            "empty or too small; add documents or lower the batch size") from None
      self.position = {"epoch": self.position["epoch"] + 1, "batch": 0}
      self._it = self._epoch_iterator(skip=0)
      return next(self)
    self.position = {**self.position, "batch": self.position["batch"] + 1}
    return batch


def eval_batches(task: str, feature_lengths: dict, converter, batch_size: int,
                 num_batches: int, split: str = "validation", seed: int = 0) -> list[dict]:
  """A fixed list of held-out batches (same masks every evaluation, so numbers compare)."""
  ds = _dataset(task, feature_lengths, converter, split, seed, shuffle=False)
  batches = list(ds.batch(host_batch_size(batch_size), drop_remainder=True)
                 .take(num_batches).as_numpy_iterator())
  if not batches:
    raise UserError(f"task {task!r} split {split!r} yields no full batch of {batch_size} "
                    "examples for evaluation; lower the eval batch size or set eval_every=0")
  return batches


def to_global(batch: dict[str, np.ndarray], sharding_of) -> dict[str, jax.Array]:
  """Assembles each host's shard into one global array sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding_of(v.ndim), v)
          for k, v in batch.items()}
