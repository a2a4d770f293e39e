"""`aot`: the train step compiled by libtpu for a TPU topology that is not here.

A tiny 3-layer BERT on v5e:2x2 (4 chips): compiles take seconds. The references are other
compiles (the whole stack unrolled, which XLA's cost model counts in full) and the model's
parameter bytes, not the code's own arithmetic.
"""

import io
import json
import math
from contextlib import redirect_stderr, redirect_stdout

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("libtpu")

from pretrain_jax import __main__ as cli  # noqa: E402
from pretrain_jax.config import configure  # noqa: E402
from pretrain_jax.training import aot, partitioning  # noqa: E402

TINY = ["--gin_file=experiments/bert_tiny_cpu.gin", "--gin.BertConfig.num_layers=3",
        "--gin.BertConfig.scan_unroll=1", "--gin.train.stages=((900, 64),)",
        "--gin.train.batch_size=16"]


def _cli(*argv) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with redirect_stdout(out), redirect_stderr(err):
    rc = cli.main(list(argv))
  return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny_result():
  rc, out, err = _cli("aot", *TINY, "--topology=v5e:2x2", "--json")
  assert rc == 0, err
  return json.loads(out)


def test_the_report_says_what_a_chip_holds_and_how_long_the_recipe_takes(tiny_result):
  r = tiny_result
  assert (r["chips"], r["devices"], r["mesh"]["data"]) == (4, 4, 4)
  assert r["fits"] and r["bytes_per_chip"] < r["hbm_per_chip"]
  stage, = r["stages"]
  # data-parallel: every chip holds all parameters (fp32) and AdamW's two moments
  params = 4 * sum(math.prod(s) for s in _param_shapes())
  assert stage["params_bytes_per_chip"] == params
  assert stage["optimizer_bytes_per_chip"] == 2 * params + 8  # + two int32 step counts
  assert stage["step_seconds"] == pytest.approx(
      max(stage["compute_seconds"], stage["hbm_seconds"]) + stage["collective_seconds"])
  assert r["recipe_days"] == pytest.approx(900 * stage["step_seconds"] / 86400)
  # XLA's count of the whole step lands near the model's 6 x MACs formula
  assert 0.9 < stage["flops_per_step"] / stage["formula_flops_per_step"] < 1.5


def _param_shapes():
  configure(["experiments/bert_tiny_cpu.gin"], [b[len("--gin."):] for b in TINY[1:]])
  from pretrain_jax.config import bound
  from pretrain_jax.training import train_state
  model = train_state.AbstractModel.build(bound("train.model"), 0)
  return [x.shape for x in jax.tree.leaves(model.params)]


def test_depth_extrapolation_equals_the_unrolled_compile_and_all_reduce_moves_the_gradients(
    tiny_result):
  """XLA counts a scanned body once: the 1- and 2-layer compiles extrapolated to 3 layers
  must give what XLA counts for the 3 layers unrolled; the data-parallel all-reduce moves
  2 (n - 1)/n of the gradient bytes: the tied word embeddings twice (their lookup and output
  gradients are reduced separately, before they are summed), the position table only for the
  64 positions a length-64 step uses."""
  stage, = tiny_result["stages"]
  configure(["experiments/bert_tiny_cpu.gin"], [b[len("--gin."):] for b in TINY[1:]])
  mesh = partitioning.make_mesh(devices=aot.topology_devices("v5e:2x2"))
  run = aot._Run.from_gin()
  setup, compiled, _ = aot._compile(run, mesh, 64, 16, 1, {"BertConfig.scan_unroll": True})
  unrolled = aot.report(compiled)
  np.testing.assert_allclose(stage["flops_per_step"] / 4, unrolled["flops"], rtol=2e-3)
  np.testing.assert_allclose(stage["hbm_bytes_per_chip"], unrolled["bytes_accessed"], rtol=2e-2)
  moved = aot.collective_bytes(compiled.as_text(), 4)
  assert stage["collective_bytes_per_chip"] == {"all-reduce": moved["all-reduce"]}
  params = setup.abstract_with_shardings().params
  gradient_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
  words = params["encoder"]["token_embed"]["embedding"]
  positions = params["encoder"]["position_embed"]["embedding"]
  unused = (positions.shape[0] - 64) * positions.shape[1] * 4
  np.testing.assert_allclose(moved["all-reduce"],
                             2 * 3 / 4 * (gradient_bytes + words.size * 4 - unused), rtol=1e-4)


def test_a_config_that_does_not_fit_fails_at_compile_time_in_one_line(tmp_path):
  rc, out, err = _cli("aot", *TINY, "--gin.train.batch_size=65536",
                      "--gin.train.stages=((1, 128),)", "--topology=v5e:2x2")
  assert rc == 2 and out == ""
  line, = err.strip().splitlines()
  assert line.startswith("error: the step at sequence length 128 on v5e:2x2") and \
      "does not fit: it needs" in line and "HBM per device; temporaries dominate" in line, line


@pytest.mark.parametrize("argv, expected", [
    (["--topology=v5e:3x3"], "TPU topology 'v5e:3x3' was not accepted"),
    (["--topology=v5e:2x2", "--gin.make_mesh.data=8"], "multiply to 8, but there are 4"),
    ([], "aot needs --topology"),
])
def test_a_topology_or_mesh_that_cannot_be_had_is_one_line(argv, expected):
  rc, out, err = _cli("aot", *TINY, *argv)
  assert rc == 2 and out == ""
  line, = err.strip().splitlines()
  assert expected in line, line


def test_a_later_stage_compiles_the_run_s_own_model(monkeypatch):
  """The cost compiles (unrolled, at 1 and 2 layers) must leave no gin binding behind: the
  next stage's memory compile is the run's own model, 3 layers scanned by default. (The paper
  config at toy width: its gin binds no scan_unroll, the case that leaked.)"""
  gin.clear_config()  # earlier tests' bindings (a mesh of 8) must not reach this run
  configure(["experiments/bert_base_paper.gin"],
            ["BertConfig.num_layers=3", "BertConfig.hidden=32", "BertConfig.num_heads=2",
             "BertConfig.mlp_dim=64", "train.batch_size=16",
             "train.stages=((900, 64), (100, 128))"])
  seen, compile_ = [], aot._compile

  def recording(run, mesh, length, batch_size, num_microbatches, bindings, *args):
    setup, compiled, seconds = compile_(run, mesh, length, batch_size, num_microbatches,
                                        bindings, *args)
    if not bindings:  # a stage's memory compile
      cfg = setup.model_config  # repr: True == 1, but True unrolls the whole stack
      seen.append((length, cfg.num_layers, repr(cfg.scan_unroll)))
    return setup, compiled, seconds

  monkeypatch.setattr(aot, "_compile", recording)
  aot.compile_run("v5e:2x2")
  assert seen == [(64, 3, "1"), (128, 3, "1")]


def test_kernels_are_chosen_for_the_topology_not_the_host():
  """Traced here for a TPU mesh, MoE experts run `ragged_dot` (TPU's grouped matmul), not the
  CPU's block layout, whose per-block weight copies made DeepSeek-V2-Lite's pod step need
  22.5 TB of temporaries per v5p chip; off a mesh, this CPU host keeps its own choice."""
  from pretrain_jax.layers import moe
  tpu_mesh = jax.sharding.Mesh(np.array(aot.topology_devices("v5e:2x2")), ("data",))
  args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in ((64, 16), (4, 16, 32), (4, 16, 32),
                                                          (4, 32, 16))]
  sizes = jax.ShapeDtypeStruct((4,), jnp.int32)
  trace = lambda: str(jax.make_jaxpr(moe.grouped_swiglu)(*args, sizes))  # noqa: E731
  with jax.set_mesh(tpu_mesh):
    on_tpu = trace()
  on_host = trace()
  assert "ragged_dot" in on_tpu and "ragged_dot" not in on_host
