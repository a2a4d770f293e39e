"""The trainer end to end on a tiny BERT: loss falls, 1 device == 8 sharded devices, resume."""

import json
import os
import signal
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest

import helpers
from pretrain_jax.config import bound, configure
from pretrain_jax.errors import UserError
from pretrain_jax.training import metrics as metrics_lib, partitioning, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["train.batch_size = 8", "train.sequence_length = 32", "train.log_every = 2",
        "train.eval_every = 6", "train.eval_batches = 2", "train.checkpoint_every = 100",
        "BertConfig.max_positions = 32", "warmup_linear_decay.warmup_steps = 2",
        "warmup_linear_decay.learning_rate = 5e-3"]


def _train(model_dir, steps, *bindings):
  return helpers.train(model_dir, ["experiments/bert_tiny_cpu.gin"],
                       TINY + [f"train.num_steps = {steps}", *bindings])


_losses = helpers.losses


def test_one_device_equals_eight_sharded_devices(tmp_path):
  assert jax.device_count() == 8
  single = _train(tmp_path / "one", 12, "make_mesh.num_devices = 1")
  # The `eval` verb on the final checkpoint reproduces the run's last held-out numbers.
  evaluated = trainer.evaluate_checkpoint(str(tmp_path / "one"), "validation")
  assert evaluated["step"] == 12
  np.testing.assert_allclose(evaluated["mlm_loss"], single[-1]["mlm_loss"], rtol=1e-5)
  sharded = _train(tmp_path / "eight", 12, "make_mesh.data = 2", "make_mesh.fsdp = 2",
                   "make_mesh.tensor = 2")
  print("1 device :", _losses(single))
  print("8 devices:", _losses(sharded))
  np.testing.assert_allclose(_losses(single), _losses(sharded), rtol=2e-4)
  np.testing.assert_allclose(_losses(single, "validation"), _losses(sharded, "validation"),
                             rtol=2e-4)
  assert _losses(single)[-1] < _losses(single)[0] - 0.5, "loss must fall"
  for split in ("train", "validation"):  # TensorBoard events beside metrics.jsonl
    assert os.listdir(tmp_path / "one" / "tb" / split)[0].startswith("events.out.tfevents")
  assert (tmp_path / "one" / "metrics.png").stat().st_size > 10_000


def test_sixty_four_fake_devices_give_the_losses_of_one(tmp_path):
  """The tiny BERT over a 64-way data 4 x fsdp 8 x tensor 2 mesh (a pod slice's worth of
  devices, simulated on CPU) against a 1-device run, each in its own process."""
  flags = [f"--gin.{b.replace(' ', '')}" for b in TINY] + [
      "--gin.train.batch_size=64", "--gin.train.num_steps=3", "--gin.train.eval_every=0",
      "--gin.train.log_every=1"]
  losses = {}
  for devices, mesh in ((1, []), (64, ["--gin.make_mesh.data=4", "--gin.make_mesh.fsdp=8",
                                       "--gin.make_mesh.tensor=2"])):
    model_dir = tmp_path / str(devices)
    env = {**_env(), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    subprocess.run([sys.executable, "-m", "pretrain_jax", "train",
                    "--gin_file=experiments/bert_tiny_cpu.gin", f"--model_dir={model_dir}",
                    "--no_progress", *flags, *mesh], cwd=REPO, env=env, check=True,
                   capture_output=True)
    losses[devices] = _losses(metrics_lib.read(str(model_dir)))
  assert len(losses[1]) == 3
  np.testing.assert_allclose(losses[64], losses[1], rtol=2e-5)


def test_a_mesh_axis_that_does_not_divide_a_parameter_names_it():
  with pytest.raises(UserError, match=r"attention/key/bias has shape \(2, 2, 64\): its axis 1 of "
                                      r"2 does not split 8 ways over mesh axis tensor"):
    _train("unused", 1, "make_mesh.tensor = 8")


def test_parameters_and_optimizer_state_are_sharded():
  gin.clear_config()
  configure(["experiments/bert_tiny_cpu.gin", "meshes/data2_fsdp2_tensor2.gin"], TINY)
  setup = trainer.Setup(bound("train.model"), bound("train.loss_fn"), 10)
  state = setup.init_state()
  print(partitioning.describe(state.params))
  params = state.params
  embedding = params["encoder"]["token_embed"]["embedding"][...]
  assert embedding.shape == (8064, 128)
  assert embedding.sharding.spec == jax.P("tensor", "fsdp")
  assert {s.data.shape for s in embedding.addressable_shards} == {(4032, 64)}
  # a scanned stack: [layers, ...], the layers axis replicated
  query = params["encoder"]["layers"]["block"]["attention"]["query"]["kernel"][...]
  assert query.shape == (2, 128, 2, 64)
  assert query.sharding.spec == jax.P(None, "fsdp", "tensor", None)
  assert {s.data.shape for s in query.addressable_shards} == {(2, 64, 1, 64)}
  wi = params["encoder"]["layers"]["block"]["mlp"]["wi"]["kernel"][...]
  assert {s.data.shape for s in wi.addressable_shards} == {(2, 64, 256)}
  # Adam's moments follow their parameters; the step counter is replicated.
  mu = state.opt_state[1][0].mu["encoder"]["token_embed"]["embedding"][...]
  assert mu.sharding.spec == embedding.sharding.spec
  assert state.step.sharding.spec == jax.P()
  # Each device holds a quarter of the embedding (replicated only over the data axis).
  assert sum(s.data.size for s in embedding.addressable_shards) == embedding.size * 2


def test_gradient_accumulation_matches_full_batch(tmp_path):
  no_dropout = ["BertConfig.dropout_rate = 0.0", "BertConfig.attention_dropout_rate = 0.0",
                "train.eval_every = 0"]
  full = _train(tmp_path / "full", 4, *no_dropout)
  accumulated = _train(tmp_path / "acc", 4, *no_dropout, "train.num_microbatches = 2")
  np.testing.assert_allclose(_losses(full), _losses(accumulated), rtol=1e-4)


def _cli(model_dir, steps):
  return [sys.executable, "-m", "pretrain_jax", "train",
          "--gin_file=experiments/bert_tiny_cpu.gin", f"--model_dir={model_dir}",
          "--no_progress", *[f"--gin.{b.replace(' ', '')}" for b in TINY],
          f"--gin.train.num_steps={steps}", "--gin.train.checkpoint_every=10",
          "--gin.train.eval_every=10"]


def _env():
  return {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
          "TF_CPP_MIN_LOG_LEVEL": "3"}


def test_resume_after_kill_9_replays_the_same_metrics(tmp_path):
  steps = 50
  straight = tmp_path / "straight"
  subprocess.run(_cli(straight, steps), cwd=REPO, env=_env(), check=True,
                 capture_output=True)
  killed = tmp_path / "killed"  # given as a relative path: orbax itself wants absolute ones
  proc = subprocess.Popen(_cli("killed", steps), cwd=tmp_path, env=_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while not (killed / "checkpoints" / "20").exists():
    assert proc.poll() is None, "the run ended before it could be killed"
    assert time.time() < deadline
    time.sleep(0.05)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  done = [int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit()]
  assert max(done) < steps, "killed too late to test a resume"
  with open(killed / "metrics.jsonl", "a") as f:  # as if it died halfway through a write
    f.write('{"step": 99, "split": "tra')
  resumed = subprocess.run(_cli("killed", steps), cwd=tmp_path, env=_env(), check=True,
                           capture_output=True, text=True)
  resumed_from = int(resumed.stdout.split("Resuming from step ")[1].split()[0])
  assert 20 <= resumed_from < steps
  timing = {"tokens_per_sec", "mfu"}
  strip = lambda rs: [{k: v for k, v in r.items() if k not in timing} for r in rs]
  a, b = strip(metrics_lib.read(str(straight))), strip(metrics_lib.read(str(killed)))
  assert len(a) == len(b)
  after = [(x, y) for x, y in zip(a, b) if x["step"] > resumed_from]
  assert after, "no metrics after the resume"
  for x, y in zip(a, b):
    assert x == y, f"{x} != {y}"
  assert (killed / "metrics.jsonl").read_text().endswith("}\n")  # the torn line is gone


def test_metrics_skip_a_torn_last_line_and_refuse_a_bad_one_elsewhere(tmp_path):
  good = [{"step": 1, "split": "train", "loss": 2.5}, {"step": 2, "split": "train", "loss": 2.0}]
  lines = [json.dumps(r) for r in good]
  (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 3, "spl')
  assert metrics_lib.read(str(tmp_path)) == good
  (tmp_path / "metrics.jsonl").write_text(lines[0] + '\n{"step": 3, "spl\n' + lines[1] + "\n")
  with pytest.raises(UserError, match=r"metrics.jsonl:2 is not a JSON record"):
    metrics_lib.read(str(tmp_path))


def test_sequence_length_stages_switch_by_config(tmp_path):
  """BERT's recipe: most steps at a short length, then the rest at a long one."""
  records = _train(tmp_path / "stages", 6, "train.stages = ((4, 16), (2, 32))",
                   "train.eval_every = 0", "train.log_every = 1")
  steps = [r["step"] for r in records if r["split"] == "train"]
  assert steps == [1, 2, 3, 4, 5, 6]
  assert all(np.isfinite([r["loss"] for r in records]))
  import orbax.checkpoint as ocp
  from pretrain_jax.training import checkpoints
  ckpt = checkpoints.Checkpointer(str(tmp_path / "stages" / "checkpoints"))
  position = ckpt.manager.restore(6, args=ocp.args.Composite(data=ocp.args.JsonRestore()))
  ckpt.close()
  run = position["data"].pop("run")  # the run's identity, checked on resume
  assert position["data"] == {"stage": 1, "epoch": 0, "batch": 2}  # 2 batches at length 32
  assert run == {"task": "bbc_bert", "batch_size": 8, "seed": 0, "hosts": 1, "num_steps": 6}


def test_roberta_and_spanbert_train_without_nsp(tmp_path):
  for objective in ("roberta", "spanbert"):
    records = _train(tmp_path / objective, 4, f"train.task = 'bbc_{objective}'",
                     "train.eval_every = 4", "train.log_every = 2")
    assert [r["step"] for r in records] == [0, 2, 4, 4]
    assert all("nsp_loss" not in r and np.isfinite(r["mlm_loss"]) for r in records)
