"""Times a data-position resume: replaying the epoch up to the batch (the old path, still the
fallback) against restoring the checkpointed tf.data iterator state (pipeline.TrainBatches
with state_dir), at an epoch's start and near its end.

One uninterrupted pass over epoch 0 counts its batches and saves the iterator state at each
measured position (as the trainer does at a checkpoint). Then, per position and path, the clock
runs from constructing the resumed TrainBatches to its first batch, which must equal bitwise
the uninterrupted run's batch there. Repeats are interleaved; the table shows the median.

  .venv/bin/python scripts/benchmark_resume.py --task bbc_bert --sequence_length 128 \\
      --batch_size 64 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from pretrain_jax import registry  # noqa: E402,F401  (registers the tasks)
from pretrain_jax.data import pipeline, tasks  # noqa: E402


def _cpu() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    name = next(l.split(":", 1)[1].strip() for l in out.splitlines() if "Model name" in l)
  except Exception:  # pylint: disable=broad-except
    name = platform.processor() or "unknown CPU"
  return f"{name}, {os.cpu_count()} cores"


def _size(directory: str) -> int:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(directory) for f in fs)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--task", default="bbc_bert")
  parser.add_argument("--sequence_length", type=int, default=128)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()

  lengths = pipeline.feature_lengths(args.sequence_length)
  converter = tasks.feature_converter(args.task)

  def make(**kw):
    return pipeline.TrainBatches(args.task, lengths, converter, args.batch_size, args.seed, **kw)

  work = tempfile.mkdtemp(prefix="benchmark_resume_")
  try:
    t = time.perf_counter()
    data, reference, states = make(), [], {}
    while data.position["epoch"] == 0:
      reference.append(next(data))
    epoch_length = len(reference) - 1  # the last one is epoch 1's first
    print(f"epoch 0: {epoch_length} batches of {args.batch_size} x {args.sequence_length} "
          f"({time.perf_counter() - t:.1f} s for the pass)", file=sys.stderr)
    positions = {"start (batch 1)": 1, f"end (batch {epoch_length - 1})": epoch_length - 1}
    # Second uninterrupted pass, saving the state where a checkpoint would.
    data = make()
    for batch in range(epoch_length):
      if batch in positions.values():
        states[batch] = os.path.join(work, str(batch))
        data.save_state(states[batch])
      next(data)
    data = None

    times = {(where, path): [] for where in positions for path in ("replay", "restore")}
    fresh = []  # a fresh start (batch 0, nothing to resume): the floor for either path
    for _ in range(args.repeats):
      t = time.perf_counter()
      resumed = make()
      next(resumed)
      fresh.append(time.perf_counter() - t)
      resumed = None
      for where, batch in positions.items():
        for path in ("replay", "restore"):
          t = time.perf_counter()
          resumed = make(position={"epoch": 0, "batch": batch},
                         state_dir=states[batch] if path == "restore" else None)
          first = next(resumed)
          times[where, path].append(time.perf_counter() - t)
          assert resumed.restored == (path == "restore"), (where, path)
          expected = reference[batch]
          assert all(np.array_equal(first[k], expected[k]) for k in expected), (where, path)
          resumed = None

    load = os.getloadavg()
    command = " ".join(["$ .venv/bin/python scripts/benchmark_resume.py",
                         f"--task {args.task} --sequence_length {args.sequence_length} "
                         f"--batch_size {args.batch_size} --repeats {args.repeats}"])
    print(f"\n{command}\n\nMachine: {_cpu()}; load average {load[0]:.1f} at the end; "
          f"epoch 0 of {args.task}: {epoch_length} batches. Median of {args.repeats}, seconds "
          "from constructing the resumed iterator to its first batch (bitwise the "
          "uninterrupted run's). A fresh start (batch 0, nothing to restore) takes "
          f"{statistics.median(fresh):.2f} s.\n")
    print("| resume at | replay (old) | restore state (new) | state size |")
    print("|---|---:|---:|---:|")
    med = {k: statistics.median(v) for k, v in times.items()}
    for where, batch in positions.items():
      print(f"| {where} | {med[where, 'replay']:.2f} s | {med[where, 'restore']:.2f} s | "
            f"{_size(states[batch]) / 2**20:.1f} MiB |")
    start, end = positions
    print(f"| end / start | {med[end, 'replay'] / med[start, 'replay']:.1f}x | "
          f"{med[end, 'restore'] / med[start, 'restore']:.2f}x | |")
    print("\nAll times:", {f"{w} {p}": [round(x, 2) for x in v] for (w, p), v in times.items()},
          "fresh:", [round(x, 2) for x in fresh])
  finally:
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
  main()
