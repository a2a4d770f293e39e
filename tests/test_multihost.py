"""Two processes on one machine (jax.distributed over localhost) train like one process."""

import os
import socket
import subprocess
import sys

import numpy as np

from pretrain_jax.training import metrics as metrics_lib

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
