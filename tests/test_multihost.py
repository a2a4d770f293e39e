"""Two processes on one machine (jax.distributed over localhost) train like one process."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from pretrain_jax.training import metrics as metrics_lib

import toy_models  # noqa: E402  (tests/)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = ["--gin_file=experiments/bert_tiny_cpu.gin", "--no_progress",
         "--gin.train.batch_size=8", "--gin.train.sequence_length=32",
         "--gin.BertConfig.max_positions=32", "--gin.train.num_steps=6",
         "--gin.train.log_every=2", "--gin.train.eval_every=6", "--gin.train.eval_batches=2",
         "--gin.warmup_linear_decay.warmup_steps=2",
         "--gin.host_batches.sharding='batch'"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int):
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
          "TF_CPP_MIN_LOG_LEVEL": "3"}


def test_two_processes_match_one(tmp_path):
  cmd = [sys.executable, "-m", "pretrain_jax", "train", *FLAGS]
  subprocess.run(cmd + [f"--model_dir={tmp_path / 'one'}"], cwd=REPO, env=_env(4),
                 check=True, capture_output=True)
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(cmd + [f"--model_dir={tmp_path / 'two'}",
                                   f"--coordinator_address={address}", "--num_processes=2",
                                   f"--process_id={i}"],
                            cwd=REPO, env=_env(2), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  one = metrics_lib.read(str(tmp_path / "one"))
  two = metrics_lib.read(str(tmp_path / "two"))  # written by process 0 only
  assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
  np.testing.assert_allclose([r["loss"] for r in one], [r["loss"] for r in two], rtol=2e-4)


# Two processes reading their own shards of the source (the default host_batches.sharding),
# one of them preempted mid-run: the toy LM of test_train_state.py (tests/toy_models.py).
TOY_GIN = toy_models.TRAIN_GIN + """
warmup_linear_decay.learning_rate = 1e-2
train.log_every = 1
train.eval_every = 10
train.eval_batches = 2
train.checkpoint_every = 5
train.num_steps = 20
"""
_TIMING = {"tokens_per_sec", "mfu"}


def _start_two(gin_file, model_dir, **env) -> list[subprocess.Popen]:
  address = f"127.0.0.1:{_free_port()}"
  path = os.pathsep.join([os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")])
  return [subprocess.Popen(
      [sys.executable, "-m", "pretrain_jax", "train", f"--gin_file={gin_file}",
       f"--model_dir={model_dir}", "--no_progress", f"--coordinator_address={address}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env={**_env(1), "PYTHONPATH": path, **env}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]


def _finish(procs) -> list[str]:
  """Both processes' outputs; each must exit 0."""
  try:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
  return outputs


def test_two_processes_reading_source_shards_resume_a_preemption_of_one_exactly(tmp_path):
  """Under 'source' sharding each host reads every other example of the shuffled source, so
  no 1-process run sees the same batches (that is what 'batch' sharding is for, above): the
  reference is the same 2-process run uninterrupted, and the preempted one must equal it
  record by record. Process 1 alone gets SIGTERM, in step 8 (after the step-5 checkpoint):
  the hosts agree through the preemption all-gather, both save step 8 and exit 0."""
  gin_file = tmp_path / "toy.gin"
  gin_file.write_text(TOY_GIN)
  straight, preempted, marker = tmp_path / "straight", tmp_path / "preempted", tmp_path / "paused"
  reference = _start_two(gin_file, straight)  # runs alongside: the two share nothing
  procs = _start_two(gin_file, preempted, TOY_PAUSE_AFTER="7", TOY_PAUSE_SECONDS="3",
                     TOY_PAUSE_MARKER=str(marker))
  try:
    deadline = time.time() + 300
    while not marker.exists():
      assert all(p.poll() is None for p in procs), "a process ended before the signal"
      assert time.time() < deadline
      time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGTERM)
  finally:
    first, second = _finish(procs)
  _finish(reference)
  saved = sorted(int(d) for d in os.listdir(preempted / "checkpoints") if d.isdigit())
  assert saved == [5, 8], (saved, first[-2000:])
  assert "SIGTERM: finishing this step" in second
  assert "Stopped by another host at step 8 of 20" in first, first[-2000:]
  data = json.loads((preempted / "checkpoints" / "8" / "data" / "metadata").read_text())
  assert data["run"]["hosts"] == 2 and len(data["hosts"]) == 2, data
  resumed = _finish(_start_two(gin_file, preempted))
  assert all("Resuming from step 8" in out for out in resumed), resumed[0][-2000:]
  strip = lambda rs: [{k: v for k, v in r.items() if k not in _TIMING} for r in rs]
  a = strip(metrics_lib.read(str(straight)))
  b = strip(metrics_lib.read(str(preempted)))
  assert len(a) == 20 + 3 and len(a) == len(b)  # train every step, eval at 0, 10 and 20
  for x, y in zip(a, b):
    assert x == y, f"{x} != {y}"
