"""T5: published parameter counts, KV-cache decoding == recomputation (greedy and beam), packed
examples kept apart, the architecture table, Adafactor, and tiny training on 1 vs 8 devices."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from pretrain_jax.config import bound, configure
from pretrain_jax.inference import beam_search, decoding
from pretrain_jax.models import t5
from pretrain_jax.training import metrics as metrics_lib, trainer


@pytest.mark.parametrize("name,expected", [
    ("t5_small", 60_506_624), ("t5_base", 222_903_552), ("t5_large", 737_668_096),
    ("t5_1_1_small", 76_961_152), ("t5_1_1_base", 247_577_856),
    ("t5_1_1_large", 783_150_080)])
def test_published_parameter_counts(name, expected):
  gin.clear_config()
  configure([f"models/{name}.gin"], [])
  model = nnx.eval_shape(lambda: bound("train.model")(0))
  counted = helpers.param_count(model)
  assert counted == expected == t5.param_count(model.cfg)


@pytest.mark.parametrize("architecture,ratio", [
    ("encoder_decoder", 1.0), ("encoder_decoder_shared", 0.688), ("encoder_decoder_half", 0.636),
    ("decoder_only", 0.584), ("prefix_lm", 0.584)])
def test_architecture_table_parameter_budgets(architecture, ratio):
  """The T5 paper's table: shared ≈ P + cross-attention, half ≈ P, LMs = P (+ embeddings)."""
  gin.clear_config()
  configure(["models/t5_small.gin"], [f"T5Config.architecture = '{architecture}'"])
  model = nnx.eval_shape(lambda: bound("train.model")(0))
  counted = helpers.param_count(model)
  assert counted == t5.param_count(model.cfg)
  assert counted / 60_506_624 == pytest.approx(ratio, abs=1e-3)


def _model(seed=0, **overrides):
  gin.clear_config()
  kw = dict(vocab_size=50, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_layers=2,
            dropout_rate=0.0, relative_buckets=8, relative_max_distance=16)
  return t5.T5(t5.T5Config(**{**kw, **overrides}), rngs=nnx.Rngs(seed))


ENCODER = np.array([[5, 6, 7, 8, 9, 10, 11, 1], [12, 13, 1, 0, 0, 0, 0, 0],
                    [20, 21, 22, 23, 1, 0, 0, 0]])


def _greedy_by_recomputation(model, encoder_row, steps):
  sequence = [0]
  for _ in range(steps):
    logits = model({"encoder_input_tokens": jnp.asarray(encoder_row[None]),
                    "decoder_input_tokens": jnp.asarray([sequence])})
    sequence.append(int(jnp.argmax(logits[0, -1])))
  return sequence[1:]


@pytest.mark.parametrize("mlp,tie", [("relu", True), ("gated-gelu", False)])
def test_kv_cache_decoding_equals_recomputation(mlp, tie):
  model = helpers.perturbed(_model(seed=1, mlp=mlp, tie_embeddings=tie), 1)  # not degenerate
  cached = decoding.generate(model.decoding(ENCODER), [[0]] * 3, 12)
  for row, tokens in zip(ENCODER, cached):
    assert tokens == _greedy_by_recomputation(model, row, 12)
  assert len(set(map(tuple, cached))) > 1, "the rows read different inputs"
  # beam search of width 1 is greedy; wider beams score at least as well here
  assert beam_search.beam_search(model.decoding(ENCODER), [[0]] * 3, 12,
                                 beam_size=1) == cached


def test_packed_examples_do_not_see_each_other():
  model = _model(seed=2)
  a_in, a_dec = [5, 6, 7, 1], [0, 30, 31]
  b_in, b_dec = [8, 9, 1], [0, 40, 41, 42]
  packed = {
      "encoder_input_tokens": jnp.asarray([a_in + b_in + [0]]),
      "encoder_segment_ids": jnp.asarray([[1] * 4 + [2] * 3 + [0]]),
      "encoder_positions": jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 0]]),
      "decoder_input_tokens": jnp.asarray([a_dec + b_dec + [0]]),
      "decoder_segment_ids": jnp.asarray([[1] * 3 + [2] * 4 + [0]]),
      "decoder_positions": jnp.asarray([[0, 1, 2, 0, 1, 2, 3, 0]]),
  }
  logits = np.asarray(model(packed))[0]
  alone = lambda i, d: np.asarray(model({"encoder_input_tokens": jnp.asarray([i]),
                                         "decoder_input_tokens": jnp.asarray([d])}))[0]
  np.testing.assert_allclose(logits[:3], alone(a_in, a_dec), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[3:7], alone(b_in, b_dec), rtol=1e-5, atol=1e-5)


def test_prefix_lm_sees_its_prefix_in_both_directions():
  """Changing a later prefix token moves an earlier position's logits only in the prefix LM."""
  batch = {"decoder_input_tokens": jnp.asarray([[0, 5, 6, 7, 8, 9]]),
           "decoder_causal_attention": jnp.asarray([[1, 1, 1, 1, 0, 0]])}
  changed = dict(batch, decoder_input_tokens=jnp.asarray([[0, 5, 6, 17, 8, 9]]))
  for architecture, moves in (("prefix_lm", True), ("decoder_only", False)):
    model = _model(seed=3, architecture=architecture)
    first = np.asarray(model(batch))[0, 1]
    second = np.asarray(model(changed))[0, 1]
    assert (not np.allclose(first, second, atol=1e-6)) == moves, architecture


def test_shared_encoder_decoder_uses_one_set_of_weights():
  model = _model(architecture="encoder_decoder_shared")
  assert model.decoder.layers.block.attention is model.encoder.layers.block.attention
  assert model.decoder.layers.block.mlp is model.encoder.layers.block.mlp
  assert model.decoder.layers.block.cross_attention is not None
  assert not hasattr(t5.T5Block(model.cfg, True, rngs=nnx.Rngs(0), own_self_attention=False),
                     "attention")


# Training ---------------------------------------------------------------------------------------

TINY = ["T5Config.d_model = 64", "T5Config.d_ff = 96", "T5Config.num_heads = 2",
        "T5Config.d_kv = 32", "train.batch_size = 8", "train.sequence_length = 48",
        "feature_lengths.targets_length = 16", "train.log_every = 2", "train.eval_every = 6",
        "train.eval_batches = 2", "train.checkpoint_every = 100", "rsqrt_decay.warmup_steps = 100"]


def _train(model_dir, steps, *bindings):
  return helpers.train(model_dir, ["experiments/t5_tiny_span_corruption_cpu.gin"],
                       TINY + [f"train.num_steps = {steps}", *bindings])


_losses = helpers.losses


def test_one_device_equals_eight_sharded_devices_and_loss_falls(tmp_path):
  single = _train(tmp_path / "one", 12, "make_mesh.num_devices = 1")
  sharded = _train(tmp_path / "eight", 12, "make_mesh.data = 2", "make_mesh.fsdp = 2",
                   "make_mesh.tensor = 2")
  print("1 device :", _losses(single))
  print("8 devices:", _losses(sharded))
  np.testing.assert_allclose(_losses(single), _losses(sharded), rtol=2e-4)
  np.testing.assert_allclose(_losses(single, "validation"), _losses(sharded, "validation"),
                             rtol=2e-4)
  assert _losses(single, "validation")[-1] < _losses(single, "validation")[0] - 1.0


def test_adafactor_state_is_factored_and_placed():
  gin.clear_config()
  configure(["experiments/t5_tiny_span_corruption_cpu.gin", "meshes/data2_fsdp2_tensor2.gin"],
            [])  # t5_tiny's 128 × 256 matrices: Adafactor factors dimensions ≥ 128
  setup = trainer.Setup(bound("train.model"), bound("train.loss_fn"), 10)
  state = setup.init_state()
  factored = state.opt_state[0]  # optax.adafactor: chain(scale_by_factored_rms, ...)
  leaves = jax.tree.leaves(factored)
  kernel = state.params["decoder"]["layers"]["block"]["mlp"]["wi_gate"]["kernel"][...]
  assert kernel.shape == (2, 128, 256)  # [layers, embed, mlp]
  shapes = {x.shape for x in leaves}
  # per layer of the stack: row and column statistics, not a full matrix
  assert (2, 128) in shapes and (2, 256) in shapes, "row and column statistics"
  assert (2, 128, 256) not in shapes
  assert sum(x.size for x in leaves) < 0.2 * sum(x.size for x in jax.tree.leaves(state.params))
  schedule = bound("make_optimizer.schedule")(10)
  np.testing.assert_allclose([float(schedule(s)) for s in (0, 5000, 10_000, 40_000)],
                             [0.01, 0.01, 0.01, 0.005], rtol=1e-6)


def test_generate_verb_fills_spans_with_greedy_and_beam_search(tmp_path):
  import json
  import os
  import subprocess
  import sys
  _train(tmp_path / "t5", 4, "train.checkpoint_every = 4")
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
         "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu"}
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cli = lambda *a: subprocess.run([sys.executable, "-m", "pretrain_jax", "generate",
                                   f"--model_dir={tmp_path / 't5'}", *a], cwd=repo, env=env,
                                  capture_output=True, text=True, timeout=600)
  prompts = ["The <extra_id_0> said on Monday.", "Shares in <extra_id_0> rose."]
  for extra in ([], ["--beam_size=3"]):
    run = cli(*[f"--prompt={p}" for p in prompts], "--max_new_tokens=6", "--json", *extra)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == prompts
    assert all(len(r["tokens"]) <= 6 for r in rows)
  bad = cli("--prompt=x", "--beam_size=2", "--temperature=0.7")
  assert bad.returncode == 2 and "beam search is deterministic" in bad.stderr


def test_t5_1_1_base_c4_recipe_builds_without_touching_data():
  from pretrain_jax.errors import UserError
  gin.clear_config()
  configure(["experiments/t5_1_1_base_c4_span_corruption.gin"], [])
  model = nnx.eval_shape(lambda: bound("train.model")(0))
  assert t5.param_count(model.cfg) == 247_577_856
  from pretrain_jax.data import pipeline
  assert pipeline.feature_lengths(bound("train.sequence_length")) == {"inputs": 512,
                                                                       "targets": 114}
  assert (bound("train.batch_size"), bound("train.num_steps")) == (128, 524_288)
  with pytest.raises(UserError, match="VOCAB_FILE"):
    bound("train.task")


def test_mixture_samples_its_tasks_by_rate():
  import seqio
  from pretrain_jax.data import tasks  # registers them
  vocab_top = 8100 - 100  # sentinels are the extra ids
  mixture = seqio.get_mixture_or_task("bbc_span_corruption_and_prefix_lm")
  ds = mixture.get_dataset({"inputs": 64, "targets": 64}, split="train", shuffle=True, seed=1)
  with_sentinels = [bool((ex["inputs"] >= vocab_top).any())
                    for ex in ds.take(600).as_numpy_iterator()]
  # span corruption always has a sentinel, prefix LM never: rates 3 : 1 → 0.75 ± 4.5 σ (0.08)
  assert abs(np.mean(with_sentinels) - 0.75) < 0.08, np.mean(with_sentinels)


@pytest.mark.parametrize("overlay,objective", [
    ("t5_table/decoder_only.gin", "objectives/t5_plain_lm.gin"),
    ("t5_table/prefix_lm.gin", "objectives/t5_prefix_lm.gin"),
    ("t5_table/encoder_decoder_half.gin", "objectives/t5_deshuffle.gin")])
def test_table_rows_train_with_other_objectives(tmp_path, overlay, objective):
  gin.clear_config()
  configure(["experiments/t5_tiny_span_corruption_cpu.gin", overlay, objective],
            TINY + ["train.num_steps = 10", "train.eval_every = 10"]
            + (["train.sequence_length = 64"] if "decoder_only" in overlay else []))
  trainer.train(str(tmp_path), progress=False)
  losses = _losses(metrics_lib.read(str(tmp_path)), "validation")
  assert losses[-1] < losses[0] - 0.2, losses


def test_raw_chunks_fit_both_inputs_and_targets():
  from pretrain_jax.data import tasks
  from pretrain_jax.errors import UserError
  lengths = {"inputs": 128, "targets": 16}
  with pytest.raises(UserError, match=">= 29"):
    tasks._raw_length("span_corruption")(lengths)  # pylint: disable=protected-access
  assert tasks._raw_length("span_corruption")({"inputs": 512, "targets": 114}) == 568  # pylint: disable=protected-access
  assert tasks._raw_length("deshuffle")(lengths) == 15  # pylint: disable=protected-access
  assert tasks._raw_length("prefix_lm")(lengths) == 15  # pylint: disable=protected-access
  assert tasks._raw_length("iid_noise")(lengths) == 42  # pylint: disable=protected-access


def test_adafactor_parameter_scale_is_what_keeps_a_zero_initialised_weight_still():
  """T5's Adafactor scales each step by the parameter's RMS (floored at 1e-3), so LoRA's B = 0
  moves at 1e-3 × the learning rate; `adafactor_parameter_scale=False` gives it the full step."""
  from pretrain_jax.training import optimizers  # pylint: disable=import-outside-toplevel
  params = {"b": jnp.zeros((4, 8)), "w": jnp.ones((4, 8))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  constant = lambda n: lambda step: 1e-2
  for scaled, expected_b in ((True, 1e-5), (False, 1e-2)):
    tx, _ = optimizers.make_optimizer(10, name="adafactor", schedule=constant, clip_norm=None,
                                      adafactor_parameter_scale=scaled)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(np.abs(updates["b"]), expected_b, rtol=1e-3)
    np.testing.assert_allclose(np.abs(updates["w"]), 1e-2, rtol=1e-3)  # RMS(w) = 1 either way
