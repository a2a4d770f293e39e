"""Bad input on the command line: one `error: ` line on stderr, exit status 2, no traceback,
no lost data.

Sections 1-8 run `python -m pretrain_jax train ...` as a subprocess (8 fake CPU devices). The
runs are slow to start (TensorFlow, JAX, SeqIO imports), so a module fixture starts them all at
once on a small thread pool and each test waits for its own run. Sections 9 on call the CLI's
`main([...])` in this process (its stderr through capsys), which costs no start-up; only the
read-only model_dir needs a process of its own (in a mount namespace).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import traceback

import gin
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


# 9. In process: bad files, a failing gin import, an unknown split ----------------------------

VOCABS = os.path.join(REPO, "pretrain_jax", "data", "vocabs")
SPM_MODEL = os.path.join(VOCABS, "bbc_sentencepiece_8k.model")
SPM_VOCAB = os.path.join(VOCABS, "bbc_sentencepiece_8k.vocab")  # spm_train's other file
WORDPIECE_TXT = os.path.join(VOCABS, "bbc_wordpiece_uncased_8k.txt")
_RANDOM_BYTES = random.Random(0).randbytes(4096)  # NULs among them


def _main(capsys, *args: str) -> Run:
  """`pretrain_jax.__main__.main(args)` in this process, as a Run; an exception escaping it
  becomes a traceback on its stderr (so error_line reports the broken contract)."""
  from pretrain_jax.__main__ import main  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  capsys.readouterr()
  try:
    returncode = main(list(args))
  except BaseException:  # pylint: disable=broad-except
    out, err = capsys.readouterr()
    return Run(list(args), 1, out, err + traceback.format_exc())
  finally:
    gin.clear_config()
  out, err = capsys.readouterr()
  return Run(list(args), returncode, out, err)


@pytest.fixture
def model_dir(tmp_path):
  """An existing run directory (one file in it) that a refused command must leave alone."""
  path = tmp_path / "run"
  path.mkdir()
  (path / "notes.txt").write_text("what this run is for\n")
  return path


def _refused(run: Run, model_dir) -> str:
  """error_line(run), and the model_dir kept as it was (no config.gin, nothing else)."""
  message = error_line(run)
  assert snapshot(model_dir) == {"notes.txt": hashlib.sha256(
      b"what this run is for\n").hexdigest()}, sorted(snapshot(model_dir))
  return message


def _file(tmp_path, name: str, data: bytes) -> str:
  path = tmp_path / name
  path.write_bytes(data)
  return str(path)


@pytest.mark.parametrize("kind, expected", [
    ("binary", "is not a SentencePiece model (its bytes do not parse as one)"),
    ("empty", "is empty"),
    ("wordpiece_vocab_txt", "is not a SentencePiece model (it is a text file)"),
    ("spm_vocab_file", "is not a SentencePiece model (it is a text file)")])
def test_corrupt_sentencepiece_model(capsys, tmp_path, model_dir, kind, expected):
  """The GPT-2 recipe's VOCAB_FILE (sentencepiece_vocabulary.model_file) read at once, not
  at the first tokenization inside tf.data or after the model is built."""
  path = {"binary": lambda: _file(tmp_path, "spm.model", _RANDOM_BYTES),
          "empty": lambda: _file(tmp_path, "spm.model", b""),
          "wordpiece_vocab_txt": lambda: WORDPIECE_TXT,
          "spm_vocab_file": lambda: SPM_VOCAB}[kind]()
  message = _refused(_main(capsys, "train", "--gin_file=experiments/gpt2_small_paper.gin",
                           f"--gin.VOCAB_FILE='{path}'", f"--model_dir={model_dir}"), model_dir)
  assert message.startswith(f"sentencepiece_vocabulary.model_file={path!r} {expected}"), message
  assert "give the .model file spm_train wrote" in message, message


@pytest.mark.parametrize("kind, expected", [
    ("binary", "is not UTF-8 text (byte 0x"),
    ("empty", "is empty"),
    ("sentencepiece_model", "is a SentencePiece model, not a vocab.txt"),
    ("spm_vocab_file", "(8000 lines) has no [PAD] [UNK] [CLS] [SEP] [MASK] tokens")])
def test_corrupt_wordpiece_vocab(capsys, tmp_path, model_dir, kind, expected):
  """with_wordpiece.vocab_file (the MiniLM recipe's VOCAB_FILE) where a vocab.txt belongs."""
  path = {"binary": lambda: _file(tmp_path, "vocab.txt", _RANDOM_BYTES),
          "empty": lambda: _file(tmp_path, "vocab.txt", b""),
          "sentencepiece_model": lambda: SPM_MODEL,
          "spm_vocab_file": lambda: SPM_VOCAB}[kind]()
  message = _refused(_main(capsys, "train", "--gin_file=experiments/minilm_bbc_topic.gin",
                           f"--gin.VOCAB_FILE='{path}'", f"--model_dir={model_dir}"), model_dir)
  assert message.startswith(f"with_wordpiece.vocab_file={path!r} {expected}"), message
  assert "a vocab.txt lists one WordPiece a line" in message, message


def test_failing_import_in_a_gin_file(capsys, tmp_path, model_dir):
  gin_file = tmp_path / "mine.gin"
  gin_file.write_text("include 'experiments/bert_tiny_cpu.gin'\n\nimport no_such_module\n")
  message = _refused(_main(capsys, "train", f"--gin_file={gin_file}", f"--model_dir={model_dir}"),
                     model_dir)
  assert message.startswith(f"gin: `import no_such_module` in {gin_file}:3 failed: No module "
                            "named 'no_such_module'; install that module or remove the import"), (
                                message)


@pytest.mark.parametrize("kind, expected", [
    ("directory", "is a directory; give a text file, one prompt a line"),
    ("latin1", "is not UTF-8 text (byte 0xe9 at offset 3); save it as UTF-8"),
    ("binary", "is not UTF-8 text (byte 0x")])
def test_bad_prompt_file(capsys, tmp_path, model_dir, kind, expected):
  """Checked before the checkpoint is read (this model_dir has none)."""
  path = {"directory": lambda: str(tmp_path),
          "latin1": lambda: _file(tmp_path, "prompts.txt", "café au lait\n".encode("cp1252")),
          "binary": lambda: _file(tmp_path, "prompts.txt", _RANDOM_BYTES)}[kind]()
  message = _refused(_main(capsys, "generate", "--gin_file=experiments/gpt_tiny_cpu.gin",
                           f"--model_dir={model_dir}", f"--prompt_file={path}"), model_dir)
  assert message.startswith(f"--prompt_file={path} {expected}"), message


@pytest.mark.parametrize("kind, expected", [
    ("random_bytes", r"is not text \(a NUL byte at offset \d+\)"),
    ("control_characters", r"is not text \(\d+ of its \d+ characters are control characters\)")])
def test_local_text_corpus_file_that_is_not_text(capsys, tmp_path, model_dir, kind, expected):
  """One binary file among the user's text files: refused, not trained on as mojibake."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  (corpus / "a.txt").write_text("The cat sat on the mat. It was a sunny day.\n" * 50)
  data = _RANDOM_BYTES if kind == "random_bytes" else bytes(range(1, 9)) * 20 + b"text"
  bad = _file(corpus, "b.txt", data)
  pattern = f"{corpus}/*.txt"
  message = _refused(_main(capsys, "train", *TINY, f"--model_dir={model_dir}",
                           "--gin.train.task=@local_text_task()",
                           f"--gin.local_text_task.pattern='{pattern}'"), model_dir)
  assert re.match(re.escape(f"{bad} (matched by {pattern!r}) ") + expected, message), message
  assert "the pattern must match only text files" in message, message


def test_icl_unknown_split_lists_the_splits(capsys, model_dir):
  """Checked before the checkpoint is read (this model_dir has none)."""
  message = _refused(_main(capsys, "icl", "--gin_file=experiments/gpt_tiny_cpu.gin",
                           f"--model_dir={model_dir}", "--task=bbc_topic", "--split=dev"),
                     model_dir)
  assert message == ("--split='dev': task 'bbc_topic' has no such split; its splits: train, "
                     "validation, test"), message


# 10. A read-only model_dir ----------------------------------------------------------------------

def test_model_dir_read_only(tmp_path):
  """A real read-only directory. Root ignores permission bits, so as root (these tests' usual
  user) the model_dir is bind-mounted read-only in a private mount namespace (`unshare -m`)
  around the CLI process, and os.access says EROFS as it would to anyone; any other user gets
  a mode 0555 directory."""
  model_dir = tmp_path / "run"
  model_dir.mkdir()
  (model_dir / "notes.txt").write_text("what this run is for\n")
  before = snapshot(model_dir)
  command = [sys.executable, "-m", "pretrain_jax", "train", *TINY, f"--model_dir={model_dir}"]
  if os.geteuid() == 0:
    if not shutil.which("unshare"):
      pytest.skip("running as root without unshare(1): no way to make a read-only directory")
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {tmp_path} {tmp_path} "
                            f"&& mount -o remount,bind,ro {tmp_path}"], capture_output=True,
                           text=True)
    if probe.returncode != 0:
      pytest.skip(f"running as root, and a read-only bind mount fails: {probe.stderr.strip()}")
    script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
    wrapped = ["unshare", "-m", "sh", "-c", script, "sh", str(model_dir), *command]
  else:
    model_dir.chmod(0o555)
    wrapped = command
  try:
    proc = subprocess.run(wrapped, cwd=REPO, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    run = Run(command, proc.returncode, proc.stdout, proc.stderr)
  except subprocess.TimeoutExpired as e:
    run = Run(command, None, _text(e.stdout), _text(e.stderr))
  finally:
    model_dir.chmod(0o755)  # so pytest can clean up
  message = error_line(run)
  assert message == (f"--model_dir {model_dir} is not writable; give a directory you can "
                     "write"), message
  assert snapshot(model_dir) == before


# 11. TFDS sources are opened read-only: nothing downloads at train time -------------------------

class _Timeout(Exception):
  pass


def test_missing_tfds_dataset_is_one_line_not_a_download(capsys, tmp_path, monkeypatch):
  """A causal-LM run over TFDS C4 with an empty data dir: one line naming the dataset, version,
  data dir and the `tfds build` command, quickly; no download_and_prepare, no tfds.load (which
  downloads), no network connection."""
  import seqio  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  calls = []

  def refuse(what):
    def fn(*args, **kwargs):
      calls.append(what)
      raise AssertionError(f"{what} was called")
    return fn
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse("download"))
  monkeypatch.setattr(tfds, "load", refuse("tfds.load"))
  monkeypatch.setattr(socket.socket, "connect", refuse("socket.connect"))
  monkeypatch.setattr(socket, "create_connection", refuse("socket.create_connection"))
  data_dir = tmp_path / "tfds"
  data_dir.mkdir()

  def alarm(signum, frame):
    raise _Timeout("no answer in 120 s: a download retrying?")
  previous = signal.signal(signal.SIGALRM, alarm)
  signal.alarm(120)
  try:
    run = _main(capsys, "train", "--gin_file=experiments/gpt_tiny_cpu.gin",
                "--gin.train.num_steps=2", "--gin.train.eval_every=0",
                "--gin.train.batch_size=8", "--gin.train.sequence_length=32", "--no_progress",
                f"--model_dir={tmp_path / 'run'}", "--gin.train.task=@tfds_lm_task()",
                "--gin.tfds_lm_task.tfds_name='c4/en:3.1.0'",
                "--gin.tfds_lm_task.name='bad_input_c4_lm'",
                f"--gin.tfds_lm_task.tfds_data_dir='{data_dir}'",
                "--gin.tfds_lm_task.vocabulary=@sentencepiece_vocabulary()",
                f"--gin.sentencepiece_vocabulary.model_file='{SPM_MODEL}'",
                "--gin.sentencepiece_vocabulary.extra_ids=100")
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)
    seqio.TaskRegistry.remove("bad_input_c4_lm")  # other modules list every registered task
  message = error_line(run)
  assert message == (f"TFDS dataset c4/en:3.1.0 is not prepared in {data_dir}: prepare it once "
                     f"with `tfds build c4/en:3.1.0 --data_dir={data_dir}` (downloads it), or "
                     "set TFDS_DATA_DIR to a folder that holds it"), message
  assert not calls, calls
  assert not os.listdir(data_dir)
  assert not os.listdir(tmp_path / "run")  # refused before config.gin or checkpoints/


def test_every_tfds_task_reads_only_prepared_data():
  """Every registered task over TFDS (GLUE, the gin factories' C4 tasks) has a read-only
  source, so no code path reaches seqio's `tfds.load(download=True, try_gcs=True)`."""
  import seqio  # pylint: disable=import-outside-toplevel
  from pretrain_jax.data import tasks, vocabularies  # pylint: disable=import-outside-toplevel
  vocabulary = vocabularies.bbc_sentencepiece()
  made = [tasks.tfds_lm_task(tfds_name="c4/en:3.1.0", vocabulary=vocabulary,
                             name="bad_input_tfds_lm"),
          tasks.tfds_denoising_task(tfds_name="c4/en:3.1.0", vocabulary=vocabulary,
                                    name="bad_input_tfds_denoising")]
  try:
    over_tfds = {name: seqio.get_mixture_or_task(name).source
                 for name in seqio.TaskRegistry.names()
                 if isinstance(seqio.get_mixture_or_task(name).source, seqio.TfdsDataSource)}
    assert set(made) <= set(over_tfds) and any(n.startswith("glue_") for n in over_tfds)
    writable = [n for n, source in over_tfds.items()
                if not isinstance(source, tasks.PreparedTfdsSource)
                or not source.tfds_dataset._read_only]  # pylint: disable=protected-access
    assert not writable, f"TFDS tasks that may download: {writable}"
  finally:
    for name in made:
      seqio.TaskRegistry.remove(name)
