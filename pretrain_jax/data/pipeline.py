"""Host input pipeline: SeqIO datasets → numpy batches → global, sharded jax.Arrays.

Epoch e is the task shuffled and masked with seed + e, so the data position is just
(epoch, batch). Each checkpoint also holds each host's tf.data iterator state (`save_state`:
the pipeline's counters, shuffle and prefetch buffers), so a resumed run restores the iterator
instead of replaying the epoch's preprocessing up to the batch: the resume costs the same at
any point of an epoch. Without a usable state (an old checkpoint, a damaged or mismatched
file) it says so in one line and replays: rebuilds epoch e and skips the batches already
trained on. Either way it sees exactly the batches an uninterrupted run would have seen.

Hosts split the data one of two ways (gin: `host_batches.sharding`):
  "source": each host reads its own shard of the source (SeqIO ShardInfo) — the scalable
            default; the global batch then depends on the number of hosts.
  "batch":  each host builds the whole global batch and keeps its rows — preprocessing is
            repeated on every host, but the data are identical for any number of hosts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import gin
import jax
from jax.experimental import multihost_utils
import numpy as np
import seqio
import tensorflow as tf

from pretrain_jax import config
from pretrain_jax.errors import UserError


HOST_SHARDING = ("source", "batch")


@gin.configurable
def feature_lengths(sequence_length: int, targets_length: int | None = None,
                    concatenated: bool = True) -> dict[str, int]:
  """Task feature lengths for a model sequence of `sequence_length` tokens.

  By default both features get the full length (masked LM, causal LM). With `targets_length`,
  a decoder-only model reads inputs ++ targets in one sequence (`concatenated`), while an
  encoder-decoder reads `sequence_length` inputs and writes `targets_length` targets.
  """
  if targets_length is None:
    return {"inputs": sequence_length, "targets": sequence_length}
  if not concatenated:
    return {"inputs": sequence_length, "targets": targets_length}
  if not 0 < targets_length < sequence_length:
    raise UserError(f"feature_lengths.targets_length={targets_length} must lie between 0 and "
                    f"the sequence length {sequence_length}")
  return {"inputs": sequence_length - targets_length, "targets": targets_length}


def decoder_length(sequence_length: int) -> int | None:
  """The targets length when the model reads targets as a second sequence beside
  `sequence_length` inputs (an encoder-decoder); None when it reads one sequence."""
  lengths = feature_lengths(sequence_length)
  return None if config.bound("feature_lengths.concatenated", True) else lengths["targets"]


def provider(task: str) -> seqio.DatasetProviderBase:
  """The registered task or mixture `task`; a UserError listing the registered ones if none."""
  if task not in seqio.TaskRegistry.names() and task not in seqio.MixtureRegistry.names():
    known = sorted(seqio.TaskRegistry.names()) + sorted(seqio.MixtureRegistry.names())
    raise UserError(f"unknown task or mixture {task!r}; registered: {', '.join(known)}")
  return seqio.get_mixture_or_task(task)


def _dataset(task: str, feature_lengths: dict, converter, split: str, seed: int | None,
             shuffle: bool, shard: seqio.ShardInfo | None = None):
  splits = provider(task).splits
  if split not in splits:
    raise UserError(f"task {task!r} has no split {split!r}; its splits: {', '.join(splits)}")
  # seqio.get_dataset, but without SeqIO's in-memory cache of small sources: each iterator
  # is read once, so the cache saves nothing, while a saved iterator state would carry its
  # contents (11.1 MB against 7.8 MB for BBC, batch 64 x 128) and tf.data cannot checkpoint it
  # symbolically. The examples are the same with or without it.
  ds = provider(task).get_dataset(feature_lengths, split=split, shuffle=shuffle, seed=seed,
                                  shard_info=shard, num_epochs=1, try_in_mem_cache=False)
  return converter(ds, task_feature_lengths=feature_lengths)


@gin.configurable
def host_batches(task: str, feature_lengths: dict, converter, global_batch: int, split: str,
                 seed: int, shuffle: bool, sharding: str = "source") -> tf.data.Dataset:
  """This host's batches (of global_batch / num_hosts rows) for one epoch."""
  hosts, index = jax.process_count(), jax.process_index()
  if global_batch % hosts:
    raise UserError(f"batch size {global_batch} is not divisible by the {hosts} hosts")
  if sharding not in HOST_SHARDING:
    raise UserError(f"host_batches.sharding={sharding!r}; valid: {HOST_SHARDING}")
  rows = global_batch // hosts
  if sharding == "source":
    ds = _dataset(task, feature_lengths, converter, split, seed, shuffle,
                  seqio.ShardInfo(index, hosts))
    ds = ds.batch(rows, drop_remainder=True)
  else:
    ds = _dataset(task, feature_lengths, converter, split, seed, shuffle)
    ds = ds.batch(global_batch, drop_remainder=True)
    ds = ds.map(lambda b: {k: v[index * rows:(index + 1) * rows] for k, v in b.items()})
  return ds.with_options(_host_options())


def _host_options() -> tf.data.Options:
  """Keep tf.data to a small thread pool: it shares the host's cores with the XLA step."""
  options = tf.data.Options()
  options.threading.private_threadpool_size = max(1, (os.cpu_count() or 2) // 4)
  options.threading.max_intra_op_parallelism = 1
  return options


class TrainBatches:
  """An endless, resumable iterator of host batches (dicts of numpy arrays).

  `position` {"epoch", "batch"}: where to start. `state_dir`: a directory `save_state` wrote at
  that position; its iterator state is restored instead of replaying the epoch up to the
  batch. A missing, damaged or mismatched state is announced on stderr and replayed."""

  def __init__(self, task: str, feature_lengths: dict, converter, batch_size: int, seed: int,
               split: str = "train", position: dict | None = None,
               state_dir: str | None = None):
    self.task, self.feature_lengths, self.converter = task, feature_lengths, converter
    self.split, self.seed, self.batch_size = split, seed, batch_size
    self.position = dict(position or {"epoch": 0, "batch": 0})
    self.restored = False  # whether the iterator came from a saved state (not a replay)
    if state_dir is not None:
      self.restored = self._restore(state_dir)
    if not self.restored:
      self._skip = self.position["batch"]
      self._it = self._epoch_iterator(self._skip)

  def _epoch_iterator(self, skip: int):
    """Epoch `position["epoch"]` less its first `skip` batches. `skip` is part of the graph a
    saved state belongs to (its counter is in the state), so a restore rebuilds it."""
    ds = host_batches(self.task, self.feature_lengths, self.converter, self.batch_size,
                      self.split, self.seed + self.position["epoch"], shuffle=True)
    return iter(ds.skip(skip).prefetch(2))

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
      self._skip = 0
      self._it = self._epoch_iterator(0)
      return next(self)
    self.position = {**self.position, "batch": self.position["batch"] + 1}
    return {k: v.numpy() for k, v in batch.items()}

  def save_state(self, directory: str) -> None:
    """Writes the iterator's state at this position to `directory` (replacing it): a tf.data
    iterator checkpoint plus position.json. Atomic: written beside it, then renamed."""
    if getattr(self, "_unsaveable", False):
      return
    tmp = f"{directory}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
      tf.train.Checkpoint(iterator=self._it).write(os.path.join(tmp, "iterator"))
    except tf.errors.FailedPreconditionError as e:  # e.g. a tf.py_function in the pipeline
      shutil.rmtree(tmp, ignore_errors=True)
      self._unsaveable = True
      print(f"warning: the data iterator of task {self.task!r} cannot be checkpointed "
            f"({str(e).splitlines()[0].split('}} ')[-1].split(' [Op:')[0]}); a resume "
            "replays to the data position instead", file=sys.stderr)
      return
    with open(os.path.join(tmp, _POSITION_FILE), "w") as f:
      json.dump({**self.position, "skip": self._skip, **self._identity()}, f)
    if os.path.exists(directory):
      shutil.rmtree(directory)
    os.replace(tmp, directory)

  def _identity(self) -> dict:
    return {"task": self.task, "split": self.split, "seed": self.seed,
            "batch_size": self.batch_size, "feature_lengths": dict(self.feature_lengths),
            "hosts": jax.process_count(), "process": jax.process_index()}

  def _restore(self, directory: str) -> bool:
    """Restores the iterator `save_state` wrote to `directory`; False (announced) if that is
    impossible, leaving the caller to replay."""
    try:
      with open(os.path.join(directory, _POSITION_FILE)) as f:
        saved = json.load(f)
      wanted = {**self.position, **self._identity()}
      differ = sorted(k for k in wanted if saved.get(k) != wanted[k])
      if differ:
        raise ValueError(f"it was saved at another position or setup ({', '.join(differ)} "
                         f"differ)")
      self._skip = int(saved["skip"])
      self._it = self._epoch_iterator(self._skip)
      tf.train.Checkpoint(iterator=self._it).read(
          os.path.join(directory, "iterator")).assert_consumed()
      return True
    except Exception as e:  # pylint: disable=broad-except
      self._it = None
      reason = (str(e).strip().splitlines() or [""])[0][:200]
      print(f"warning: no usable data-iterator state in {directory} ({type(e).__name__}: "
            f"{reason}); replaying {self.position['batch']} batches of epoch "
            f"{self.position['epoch']} to reach the data position (same batches, slower)",
            file=sys.stderr, flush=True)
      return False


_POSITION_FILE = "position.json"
ITERATOR_DIR = "data_iterator"


def iterator_state_dir(model_dir: str, step: int, process: int | None = None) -> str:
  """Where host `process` (default: this one) keeps its iterator state for checkpoint `step`:
  MODEL_DIR/data_iterator/STEP/process_I, beside (not inside) orbax's checkpoints/STEP."""
  process = jax.process_index() if process is None else process
  return os.path.join(model_dir, ITERATOR_DIR, str(step), f"process_{process}")


def prune_iterator_states(model_dir: str, keep) -> None:
  """Deletes the iterator states of every step not in `keep` (the checkpoints orbax kept, the
  one being written): they follow orbax's deletions. Process 0 only (the model_dir is shared)."""
  root = os.path.join(model_dir, ITERATOR_DIR)
  if jax.process_index() != 0 or not os.path.isdir(root):
    return
  keep = {str(s) for s in keep}
  for name in os.listdir(root):
    if name not in keep:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def eval_batches(task: str, feature_lengths: dict, converter, batch_size: int,
                 num_batches: int, split: str = "validation", seed: int = 0) -> list[dict]:
  """A fixed list of held-out batches (same masks every evaluation, so numbers compare)."""
  ds = host_batches(task, feature_lengths, converter, batch_size, split, seed, shuffle=False)
  batches = list(ds.take(num_batches).as_numpy_iterator())
  if jax.process_count() > 1:  # every host must run the same number of collective steps
    fewest = int(multihost_utils.process_allgather(np.int32(len(batches))).min())
    batches = batches[:fewest]
  if not batches:
    raise UserError(f"task {task!r} split {split!r} yields no full batch of {batch_size} "
                    "examples for evaluation; lower the eval batch size or set eval_every=0")
  return batches


def batch_spec(task: str, feature_lengths: dict, converter, batch_size: int,
               split: str = "train", sharding_of=None) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of `task` through `converter` as shapes and dtypes, for compiling the
  train step ahead of time: read off the converted tf.data graph's element_spec, which is
  built (the source is opened) but never iterated. `sharding_of(ndim)` as in to_global."""
  spec = _dataset(task, feature_lengths, converter, split, seed=0, shuffle=False).element_spec
  return {k: jax.ShapeDtypeStruct((batch_size, *s.shape), s.dtype.as_numpy_dtype,
                                  sharding=sharding_of(len(s.shape) + 1) if sharding_of else None)
          for k, s in spec.items()}


def to_global(batch: dict[str, np.ndarray], sharding_of) -> dict[str, jax.Array]:
  """Assembles each host's shard into one global array sharded over the batch axes."""
  return {k: jax.make_array_from_process_local_data(sharding_of(v.ndim), v)
          for k, v in batch.items()}


# SeqIO's own converters, selectable from gin (`@seqio.EncDecFeatureConverter()`).
gin.external_configurable(seqio.EncDecFeatureConverter, module="seqio")
