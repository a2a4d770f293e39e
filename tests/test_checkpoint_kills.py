"""Runs survive: SIGKILL at random moments while checkpoints are being written, and a checkpoint
restored onto another mesh shape evaluates to the same loss."""

import dataclasses
import multiprocessing
import os
import random
import shutil
import signal
import sys
import time

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretrain_jax.config import bound, configure
from pretrain_jax.training import checkpoints, metrics as metrics_lib, train_state, trainer

import toy_models  # noqa: E402  (tests/)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The toy LM of test_train_state.py (tests/toy_models.py), a checkpoint after every step: the
# process spends most of its time inside a checkpoint write, so a kill at a random moment
# usually lands in one.
KILL_GIN = toy_models.TRAIN_GIN + """
warmup_linear_decay.learning_rate = 1e-2
train.log_every = 1
train.eval_every = 10
train.eval_batches = 2
train.checkpoint_every = 1
"""
KILLS = 20
KILL_STEPS = 50  # each kill lets the run advance 2 or 3 steps at most (below)
KILL_SEED = 12  # the kills' moments: a failure reproduces with the same seed
_TIMING = {"tokens_per_sec", "mfu"}
_WARM = "PRETRAIN_JAX_TEST_FORKSERVER_WARM"


def _warm_up() -> None:
  """In the fork server only (it imports this module as a preload): import everything and
  build the task's datasets once, so tf.data's autograph conversions are cached for every
  child. Touches no jax backend: each child initialises its own."""
  from pretrain_jax import __main__, registry  # noqa: F401  pylint: disable=unused-import
  from pretrain_jax.config import bound
  from pretrain_jax.data import pipeline
  import seqio
  import toy_models  # noqa: F401  pylint: disable=unused-import
  gin.parse_config(KILL_GIN)
  lengths, converter = pipeline.feature_lengths(16), bound("train.feature_converter")
  pipeline._dataset("bbc_lm", lengths, converter, "train", 0, True, seqio.ShardInfo(0, 1))  # pylint: disable=protected-access
  pipeline._dataset("bbc_lm", lengths, converter, "validation", 0, False)  # pylint: disable=protected-access
  gin.clear_config()


if os.environ.get(_WARM) == "1":
  _warm_up()


def _child(argv, log, env=None) -> None:
  """A forked `python -m pretrain_jax ARGV` with `env` added to its environment, its stdout
  and stderr (line-buffered) to `log`."""
  os.environ.update(env or {})
  fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  os.dup2(fd, 1)
  os.dup2(fd, 2)
  sys.stdout = os.fdopen(1, "w", buffering=1)
  sys.stderr = os.fdopen(2, "w", buffering=1)
  gin.clear_config()
  from pretrain_jax.__main__ import main  # pylint: disable=import-outside-toplevel
  sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
  """A multiprocessing context whose children fork from a server that has already imported
  tensorflow, jax, seqio and orbax (a fresh interpreter takes ~5 s for them) but not started
  jax: 1 CPU device per child."""
  ctx = multiprocessing.get_context("forkserver")
  ctx.set_forkserver_preload([__name__])
  saved = {k: os.environ.get(k) for k in ("XLA_FLAGS", _WARM, "PYTHONPATH")}
  os.environ.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=1", _WARM: "1",
                     "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "tests"),
                                                   saved["PYTHONPATH"] or ""])})
  try:
    from multiprocessing import forkserver as fs  # pylint: disable=import-outside-toplevel
    fs.ensure_running()
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  yield ctx
  from multiprocessing import forkserver as fs  # pylint: disable=import-outside-toplevel
  fs._forkserver._stop()  # pylint: disable=protected-access
  ctx.set_forkserver_preload([])


def _argv(gin_file, model_dir, *bindings):
  return ["train", f"--gin_file={gin_file}", f"--model_dir={model_dir}", "--no_progress",
          f"--gin.train.num_steps={KILL_STEPS}", *[f"--gin.{b}" for b in bindings]]


def _entries(checkpoints) -> set[str]:
  return set(os.listdir(checkpoints)) if os.path.isdir(checkpoints) else set()


def _steps(entries) -> set[int]:
  """The steps of checkpoint directories, finished (STEP) or being written (STEP.orbax-...)."""
  return {int(e.split(".")[0]) for e in entries
          if e.isdigit() or (".orbax-checkpoint-tmp" in e and e.split(".")[0].isdigit())}


def _incomplete(checkpoints, entries) -> set[str]:
  """Step directories without their metadata file: orbax was deleting them."""
  return {e for e in entries
          if e.isdigit() and not (checkpoints / e / "_CHECKPOINT_METADATA").exists()}


def _finished(entries) -> list[int]:
  """The steps of finished checkpoint directories (a half-deleted old one included)."""
  return sorted(int(e) for e in entries if e.isdigit())


def _records(model_dir) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in _TIMING}
          for r in metrics_lib.read(str(model_dir))]


def test_twenty_random_kills_during_checkpoint_writes_resume_to_the_same_metrics(
    tmp_path, forkserver):
  gin_file = tmp_path / "kill.gin"
  gin_file.write_text(KILL_GIN)
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  children = []
  try:
    ref = forkserver.Process(target=_child, args=(
        _argv(gin_file, straight, f"train.checkpoint_every={KILL_STEPS}"),
        tmp_path / "ref.log"))
    children.append(ref)
    ref.start()
    ref.join(300)
    assert ref.exitcode == 0, (tmp_path / "ref.log").read_text()[-3000:]
    in_write, in_cleanup, damaged, resumed_from = _kill_and_resume(forkserver, gin_file,
                                                                   killed, children)
  finally:  # a child left blocked would keep the fork server from stopping
    for proc in children:
      if proc.is_alive():
        proc.kill()
  print(f"\nof {KILLS} kills, {in_write} left a checkpoint half written (its tmp dir), "
        f"{in_cleanup} an old one half deleted; {damaged} checkpoints were set aside as "
        f"damaged; the runs resumed from steps {resumed_from}")
  assert resumed_from[0] == 0 and resumed_from[1] == 0  # the first kill: no checkpoint yet
  # most kills land inside a save: 12-18 of 20 here, 10-11 on a loaded 2-core machine (its
  # steps slow down more than its writes)
  assert in_write >= KILLS // 4 and in_write + in_cleanup >= KILLS * 2 // 5, (
      in_write, in_cleanup, resumed_from)
  assert resumed_from[-1] < KILL_STEPS - 5  # the last run trained on from where kills left it
  a, b = _records(straight), _records(killed)
  assert len(a) == KILL_STEPS + KILL_STEPS // 10 + 1  # train: every step; eval: 0 and every 10
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x == y, f"{x} != {y}"
  assert (killed / "metrics.jsonl").read_text().endswith("}\n")


def _kill_and_resume(forkserver, gin_file, killed, children):
  """KILLS runs into `killed`, each SIGKILLed at a random moment during one of its checkpoint
  writes, then one run to the end. Every run must resume from the newest checkpoint that the
  kill left intact. Returns (how many kills left a new checkpoint half written, how many an
  old one half deleted, how many checkpoints were set aside as damaged, the step each run
  resumed from)."""
  rng = random.Random(KILL_SEED)
  checkpoints = killed / "checkpoints"
  in_write, in_cleanup, damaged, resumed_from = 0, 0, 0, []
  for attempt in range(KILLS + 1):
    before = _entries(checkpoints)
    half_deleted = _incomplete(checkpoints, before)
    log = killed.parent / f"attempt{attempt}.log"
    # A run to be killed blocks in the forward pass after step P = its start + 2, so it
    # cannot outrun the kills on a fast machine; its two checkpoint writes go on meanwhile.
    # (An evaluation at step P would block too, before P's checkpoint: then P + 1.)
    last = (_finished(before) or [0])[-1] + 2
    pause = {} if attempt == KILLS else {
        "TOY_PAUSE_AFTER": str(last + (last % 10 == 0)),
        "TOY_PAUSE_MARKER": str(killed.parent / "paused")}
    proc = forkserver.Process(target=_child, args=(_argv(gin_file, killed), log, pause))
    children.append(proc)
    proc.start()
    if attempt == KILLS:  # the last one runs to the end
      proc.join(300)
      text = log.read_text()
      assert proc.exitcode == 0, text[-3000:]
    else:
      # Wait for this run's first checkpoint write to start (an entry the killed one did not
      # leave: orbax removes the old tmp dirs on start), then kill it up to 0.12 s later,
      # within that write or the next. The first kill lands in the run's very first write:
      # the next run starts afresh.
      deadline = time.time() + 120
      while not _steps(_entries(checkpoints) - before):
        assert proc.is_alive(), log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.002)
      time.sleep(0 if attempt == 0 else rng.uniform(0, 0.12))
      os.kill(proc.pid, signal.SIGKILL)
      proc.join(60)
      assert proc.exitcode == -signal.SIGKILL, "the run ended before it was killed"
      text = log.read_text()
      left = _entries(checkpoints)
      if any("orbax-checkpoint-tmp" in e for e in left):
        in_write += 1  # a new checkpoint half written
      elif _incomplete(checkpoints, left) - half_deleted:
        in_cleanup += 1  # an old one (past keep_checkpoints) half deleted
    # This run resumed from the newest intact checkpoint the previous one left: none set aside
    # means it was the newest step directory; any set aside were damaged by the kill.
    warned = [int(s) for s in _damaged_warnings(text)]
    damaged += len(warned)
    newest = [s for s in _finished(before) if s not in warned]
    if newest:
      assert f"Resuming from step {newest[-1]} in {killed}" in text, text[-3000:]
      resumed_from.append(newest[-1])
    else:
      assert "Resuming from step" not in text, text[-3000:]
      resumed_from.append(0)
    assert "Traceback" not in text, text[-3000:]
  return in_write, in_cleanup, damaged, resumed_from


def _damaged_warnings(text: str) -> list[str]:
  marker = "warning: checkpoint "
  return [line[len(marker):].split()[0] for line in text.splitlines()
          if line.startswith(marker) and " is damaged " in line]


MESHES = ("data2_fsdp2_tensor2", "data_parallel", "fsdp")


def test_a_checkpoint_restored_onto_another_mesh_evaluates_to_the_same_loss(tmp_path):
  """The toy LM (embedding and head sharded by vocab over `tensor`, embed over `fsdp`) trained
  6 steps on data 2 x fsdp 2 x tensor 2 (8 devices), then `evaluate_checkpoint` with each mesh:
  the same held-out metrics as on the training mesh (and as the run's own last evaluation),
  and the checkpoint read onto each mesh holds the same parameters, laid out anew."""
  run = tmp_path / "run"
  gin_file = tmp_path / "toy.gin"
  gin_file.write_text(KILL_GIN)
  gin.clear_config()
  configure([str(gin_file), f"meshes/{MESHES[0]}.gin"],
            ["train.num_steps = 6", "train.eval_every = 6", "train.checkpoint_every = 6"])
  trainer.train(str(run), progress=False)
  logged = [r for r in metrics_lib.read(str(run)) if r["split"] == "validation"][-1]
  assert logged["step"] == 6
  results, params, specs = {}, {}, {}
  for mesh in MESHES:
    gin.clear_config()
    configure([str(run / "config.gin"), f"meshes/{mesh}.gin"], [])
    results[mesh] = trainer.evaluate_checkpoint(str(run))
    setup = trainer.Setup(bound("train.model"), bound("train.loss_fn"), 6)
    ckpt = checkpoints.Checkpointer(str(run / "checkpoints"), read_only=True)
    try:
      state, _ = ckpt.restore(setup.abstract_with_shardings())
    finally:
      ckpt.close()
    flat = {train_state.path_of(p): v.get_value() for p, v in nnx.to_flat_state(state.params)}
    params[mesh] = jax.device_get(flat)
    specs[mesh] = {p: (dict(x.sharding.mesh.shape), x.sharding.shard_shape(x.shape))
                   for p, x in flat.items()}
  print("\neval loss by mesh:", {m: results[m]["loss"] for m in MESHES}, "logged", logged["loss"])
  for mesh in MESHES:
    assert results[mesh]["step"] == 6
    for path, value in params[MESHES[0]].items():
      np.testing.assert_array_equal(params[mesh][path], value, err_msg=f"{mesh} {path}")
    assert set(results[mesh]) == set(results[MESHES[0]])
    for name, value in results[MESHES[0]].items():
      if isinstance(value, float):
        np.testing.assert_allclose(results[mesh][name], value, rtol=1e-6,
                                   err_msg=f"{mesh} {name}")
  np.testing.assert_allclose(results[MESHES[0]]["loss"], logged["loss"], rtol=1e-6)
  # The arrays really were laid out anew: the head's (8, 8128) kernel split 2 x 2 over fsdp
  # and tensor on the training mesh, 8 ways over fsdp on `fsdp`, whole on `data_parallel`.
  kernel = {m: specs[m]["head/kernel"] for m in MESHES}
  assert kernel == {
      "data2_fsdp2_tensor2": ({"data": 2, "fsdp": 2, "tensor": 2, "expert": 1}, (4, 4064)),
      "data_parallel": ({"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}, (8, 8128)),
      "fsdp": ({"data": 1, "fsdp": 8, "tensor": 1, "expert": 1}, (1, 8128))}, kernel


@dataclasses.dataclass
class _Tiny:
  w: jax.Array


jax.tree_util.register_dataclass(_Tiny, data_fields=["w"], meta_fields=[])


def test_a_step_damaged_again_after_its_rewrite_is_set_aside_again(tmp_path):
  """A resumed run rewrites the step it set aside; damaged again (the host died writing it
  again), it goes to STEP.damaged.1 and the one before resumes. This was an OSError: the
  rename onto the first STEP.damaged."""
  w = jnp.arange(4.0)
  abstract = _Tiny(jax.ShapeDtypeStruct(w.shape, w.dtype, sharding=w.sharding))
  ckpt = checkpoints.Checkpointer(str(tmp_path), keep=5)
  try:
    for step in (1, 2):
      ckpt.save(step, _Tiny(w + step), {"batch": step})
    ckpt.wait()
    for rewrite in range(3):
      shutil.rmtree(tmp_path / "2" / "state")
      state, position = ckpt.restore(abstract)
      assert position == {"batch": 1}
      np.testing.assert_array_equal(state.w, w + 1)
      ckpt.save(2, _Tiny(w + 10 + rewrite), {"batch": 2})
      ckpt.wait()
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "2.damaged", "2.damaged.1", "2.damaged.2"]
    state, position = ckpt.restore(abstract)
    assert position == {"batch": 2}
    np.testing.assert_array_equal(state.w, w + 12)
  finally:
    ckpt.close()
