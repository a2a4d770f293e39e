"""Bad input on the command line: one `error: ` line on stderr, exit status 2, no traceback,
no lost data.

Every case runs `python -m pretrain_jax train ...` as a subprocess (8 fake CPU devices). The
runs are slow to start (TensorFlow, JAX, SeqIO imports), so a module fixture starts them all at
once on a small thread pool and each test waits for its own run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300  # a run here takes 10-60 s on 2 idle cores, over 100 s on busy ones

TINY = ["--gin_file=experiments/bert_tiny_cpu.gin",
        "--gin.train.num_steps=2", "--gin.train.eval_every=0", "--gin.train.log_every=1",
        "--gin.train.batch_size=8", "--gin.train.sequence_length=32", "--no_progress"]

# Log lines that third-party native/Python loggers write to stderr and TF_CPP_MIN_LOG_LEVEL does
# not silence; they are not part of the CLI's own report, so the one-line check skips them.
_NOISE = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called"),
    re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\] "),  # glog / absl C++ log lines
    re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL):[\w.]+:"),  # Python logging, default format
)


def _env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  env["JAX_PLATFORMS"] = "cpu"  # the 8 fake devices are CPU devices, also on a GPU host
  return env


@dataclasses.dataclass
class Run:
  args: list
  returncode: int | None  # None: it did not exit within TIMEOUT_S and was killed
  stdout: str
  stderr: str

  def describe(self) -> str:
    return (f"command: pretrain_jax {' '.join(self.args)}\nexit status: {self.returncode}\n"
            f"--- stderr ---\n{self.stderr}\n--- stdout (tail) ---\n{self.stdout[-2000:]}")


def _text(data) -> str:
  return data.decode("utf-8", "replace") if isinstance(data, bytes) else (data or "")


def _cli(*args: str) -> Run:
  try:
    proc = subprocess.run([sys.executable, "-m", "pretrain_jax", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)
  except subprocess.TimeoutExpired as e:  # killed; report what it wrote before hanging
    return Run(list(args), None, _text(e.stdout),
               _text(e.stderr) + f"\n[test: the process had not exited after {TIMEOUT_S} s and "
               "was killed]")
  return Run(list(args), proc.returncode, proc.stdout, proc.stderr)


def _train(model_dir, *extra: str) -> Run:
  return _cli("train", *TINY, f"--model_dir={model_dir}", *extra)


def error_line(run: Run) -> str:
  """Asserts the bad-input contract and returns the message after `error: `."""
  assert run.returncode is not None, "the process hung instead of exiting:\n" + run.describe()
  assert "Traceback" not in run.stderr, run.describe()
  assert run.returncode == 2, run.describe()
  own = [line for line in run.stderr.splitlines()
         if line.strip() and not any(p.search(line) for p in _NOISE)]
  assert len(own) == 1 and own[0].startswith("error: "), (
      "expected exactly one line on stderr, starting with 'error: ' (besides third-party "
      f"log lines); got {len(own)} line(s) of its own:\n" + "\n".join(own) + "\n\n"
      + run.describe())
  return own[0][len("error: "):]


def snapshot(directory) -> dict[str, str]:
  """Relative path -> sha256 of every file below `directory` (empty dirs as 'dir')."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for d in dirs:
      path = os.path.join(root, d)
      if not os.listdir(path):
        out[os.path.relpath(path, directory) + "/"] = "dir"
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
  return out


# The runs -----------------------------------------------------------------------------------

def _architecture_mismatch(tmp) -> dict:
  model_dir = tmp / "arch"
  first = _train(model_dir, "--gin.train.checkpoint_every=1", "--gin.BertConfig.hidden=64")
  if first.returncode != 0:
    return {"model_dir": model_dir, "first": first}
  before = snapshot(model_dir)
  second = _train(model_dir, "--gin.train.checkpoint_every=1")  # default hidden = 128
  return {"model_dir": model_dir, "first": first, "before": before,
          "second": second, "after": snapshot(model_dir)}


def _nan(tmp) -> dict:
  model_dir = tmp / "nan"
  # Warmup 0: step 0 already applies lr 1e30 unclipped, so params blow up after one step and
  # the loss of step 2 is not finite; 4 steps leave room for it to be caught before the end.
  run = _train(model_dir, "--gin.train.num_steps=4", "--gin.warmup_linear_decay.warmup_steps=0",
               "--gin.warmup_linear_decay.learning_rate=1e30",
               "--gin.make_optimizer.clip_norm=None")
  return {"model_dir": model_dir, "run": run}


def _corpus(tmp, name: str, files: dict[str, str]) -> str:
  folder = tmp / "corpora" / name
  folder.mkdir(parents=True)
  for file_name, text in files.items():
    (folder / file_name).write_text(text)
  return f"{folder}/*.txt"


def _local_text(tmp, name: str, pattern: str) -> dict:
  run = _train(tmp / f"local_{name}", "--gin.train.task=@local_text_task()",
               f"--gin.local_text_task.pattern='{pattern}'")
  return {"pattern": pattern, "run": run}


def _a_file(tmp):
  path = tmp / "a_file"
  path.write_text("not a directory\n")
  return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("bad_input")
  patterns = {
      "no_files": _corpus(tmp, "no_files", {}),
      "blank_files": _corpus(tmp, "blank_files", {"a.txt": "", "b.txt": "  \n\n\t \n",
                                                  "c.txt": "\n"}),
      "tiny": _corpus(tmp, "tiny", {
          "a.txt": "The cat sat on the mat. It was a sunny day.\n",
          "b.txt": "Markets rose in London today. Shares in banks gained.\n"}),
  }
  jobs = {  # slowest first
      "architecture": lambda: _architecture_mismatch(tmp),
      "nan": lambda: _nan(tmp),
      "sequence_length": lambda: _train(tmp / "seq", "--gin.train.sequence_length=256"),
      "tiny_corpus": lambda: _local_text(tmp, "tiny", patterns["tiny"]),
      "no_files": lambda: _local_text(tmp, "no_files", patterns["no_files"]),
      "blank_files": lambda: _local_text(tmp, "blank_files", patterns["blank_files"]),
      "mesh": lambda: _train(tmp / "mesh", "--gin.make_mesh.data=3"),
      "unknown_parameter": lambda: _train(tmp / "gin1", "--gin.train.num_stepz=3"),
      "unknown_configurable": lambda: _train(tmp / "gin2", "--gin.NoSuchThing.x=1"),
      "missing_gin_file": lambda: _cli("train", "--gin_file=no/such.gin",
                                       f"--model_dir={tmp / 'gin3'}", "--no_progress"),
      "model_dir_is_a_file": lambda: _train(_a_file(tmp)),
      "model_dir_cannot_be_made": lambda: _train(_a_file(tmp) / "run"),
      "negative_eval_every": lambda: _train(tmp / "ev", "--gin.train.eval_every=-1"),
      "zero_keep_checkpoints": lambda: _train(tmp / "kc", "--gin.train.keep_checkpoints=0"),
      "show_data_num": lambda: _cli("show-data", "--task=bbc_lm", "--num=0"),
      "show_data_length": lambda: _cli("show-data", "--task=bbc_lm", "--sequence_length=-3"),
      "distributed": lambda: _cli("show-data", "--task=bbc_lm", "--num_processes=2",
                                  "--process_id=7", "--coordinator_address=127.0.0.1:12355"),
  }
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=3)
  futures = {name: pool.submit(job) for name, job in jobs.items()}
  yield {name: future.result for name, future in futures.items()}
  pool.shutdown(wait=True, cancel_futures=True)


# 1. Unknown gin bindings ---------------------------------------------------------------------

def test_unknown_gin_parameter(runs):
  message = error_line(runs["unknown_parameter"]())
  assert "num_stepz" in message, message


def test_unknown_gin_configurable(runs):
  message = error_line(runs["unknown_configurable"]())
  assert "NoSuchThing" in message, message


# 7. Missing gin file --------------------------------------------------------------------------

def test_missing_gin_file(runs):
  message = error_line(runs["missing_gin_file"]())
  assert "no/such.gin" in message, message


# 2. Mesh that does not cover the devices -----------------------------------------------------

def test_mesh_product_not_device_count(runs):
  message = error_line(runs["mesh"]())
  assert re.search(r"'data': 3\b|data=3\b", message), message
  assert re.search(r"\b8\b", message) and "device" in message, message


# 3. Sequence length above the position embeddings ---------------------------------------------

def test_sequence_length_above_max_positions(runs):
  message = error_line(runs["sequence_length"]())
  assert re.search(r"\b256\b", message), message
  assert re.search(r"\b128\b", message), message


# 4. Empty or too small corpus -----------------------------------------------------------------

def test_local_text_no_matching_files(runs):
  result = runs["no_files"]()
  message = error_line(result["run"])
  assert result["pattern"] in message, message


def test_local_text_only_blank_files(runs):
  result = runs["blank_files"]()
  message = error_line(result["run"])
  assert result["pattern"] in message, message


def test_local_text_too_small_for_a_batch(runs):
  result = runs["tiny_corpus"]()
  message = error_line(result["run"])
  assert "local_text" in message, message  # the task
  assert "train" in message, message  # the split
  assert re.search(r"\b8\b", message), message  # the batch size


# 5. A checkpoint of another architecture in model_dir -----------------------------------------

def test_checkpoint_of_another_architecture(runs):
  result = runs["architecture"]()
  assert result["first"].returncode == 0, "the hidden=64 run failed:\n" + result["first"].describe()
  model_dir = str(result["model_dir"])
  checkpoints_before = {k: v for k, v in result["before"].items() if k.startswith("checkpoints")}
  assert checkpoints_before, f"the first run saved no checkpoint: {sorted(result['before'])}"

  message = error_line(result["second"])
  assert model_dir in message, message
  # Names a parameter (a path ending in a parameter's leaf name) ...
  assert re.search(r"[\w/]*(kernel|bias|scale|embedding)\b", message), message
  # ... and both shapes: one holding 64 (the checkpoint), one holding 128 (this model).
  shapes = re.findall(r"\(\d+(?:, *\d+)*,?\)", message)
  assert any(re.search(r"\b64\b", s) for s in shapes), (shapes, message)
  assert any(re.search(r"\b128\b", s) for s in shapes), (shapes, message)

  checkpoints_after = {k: v for k, v in result["after"].items() if k.startswith("checkpoints")}
  assert checkpoints_after == checkpoints_before, "the checkpoints changed"


# 6. Non-finite loss ---------------------------------------------------------------------------

def test_nan_loss_stops_without_saving(runs):
  result = runs["nan"]()
  message = error_line(result["run"])
  found = re.search(r"\bstep (\d+)", message)
  assert found, message
  assert re.search(r"not sav|without saving|not been saved|unsaved", message), message
  bad_step = int(found.group(1))
  checkpoint_dir = result["model_dir"] / "checkpoints"
  saved = sorted(int(d) for d in os.listdir(checkpoint_dir) if d.isdigit()) if (
      checkpoint_dir.exists()) else []
  assert all(s < bad_step for s in saved), (
      f"a checkpoint at or after the non-finite step {bad_step} was saved: {saved}")


# 5b. The refused run leaves the whole model_dir alone (kept last: -x asserts the rest first) --

def test_checkpoint_of_another_architecture_keeps_model_dir(runs):
  """The refused run must not overwrite what documents the checkpoint (config.gin, metrics)."""
  result = runs["architecture"]()
  assert result["first"].returncode == 0, "the hidden=64 run failed:\n" + result["first"].describe()
  assert result["second"].returncode != 0, result["second"].describe()
  changed = sorted(k for k in set(result["before"]) | set(result["after"])
                   if result["before"].get(k) != result["after"].get(k))
  assert not changed, f"the refused run changed files in the model_dir: {changed}"


# 8. Run options and model_dir ------------------------------------------------------------------

def test_model_dir_that_is_a_file(runs):
  message = error_line(runs["model_dir_is_a_file"]())
  assert "a_file is a file; give a directory" in message, message


def test_model_dir_that_cannot_be_created(runs):
  message = error_line(runs["model_dir_cannot_be_made"]())
  assert "a_file/run cannot be created" in message, message


@pytest.mark.parametrize("name, expected", [
    ("negative_eval_every", "train.eval_every=-1; it must be an integer >= 0"),
    ("zero_keep_checkpoints", "train.keep_checkpoints=0; it must be a positive integer"),
    ("show_data_num", "--num=0; it must be a positive integer"),
    ("show_data_length", "--sequence_length=-3; it must be a positive integer")])
def test_non_positive_counts(runs, name, expected):
  message = error_line(runs[name]())
  assert message.startswith(expected), message


def test_a_failing_jax_distributed_initialize(runs):
  message = error_line(runs["distributed"]())
  assert message.startswith("jax.distributed.initialize failed (coordinator 127.0.0.1:12355, 2 "
                            "processes, this one 7)"), message
