"""Parameter-efficient finetuning (pretrain_jax/peft): LoRA, Houlsby adapters, prefix tuning,
banks of tuned weights per example, delta checkpoints, and their refusals."""

import glob
import json
import os
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pretrain_jax import peft
from pretrain_jax.config import bound, configure
from pretrain_jax.errors import UserError
from pretrain_jax.inference import loading
from pretrain_jax.models.bert import BertClassifier, BertConfig
from pretrain_jax.peft import adapters, delta as delta_lib, lora, prefix
from pretrain_jax.training import checkpoints, train_state, trainer
from pretrain_jax.training.train_state import TrainState

TINY = BertConfig(vocab_size=512, hidden=64, num_layers=2, num_heads=4, mlp_dim=128,
                  max_positions=32)


def _classifier(*methods, cfg=TINY, classes=5, seed=0) -> nnx.Module:
  factory = lambda s: BertClassifier(cfg, classes, rngs=nnx.Rngs(s))
  return peft.Finetune(tuple(methods)).wrap(factory)(seed)


def _batch(batch=4, length=16, vocab=512, classes=5, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, vocab, (batch, length)).astype(np.int32)
  ids[:, -3:] = 0  # padding
  return {"input_ids": ids,
          "token_type_ids": (np.arange(length) >= length // 2).astype(np.int32)[None].repeat(
              batch, 0),
          "label": rng.integers(0, classes, (batch,)).astype(np.int32)}


def _logits(model, batch):
  return np.asarray(model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["token_type_ids"])))


def _flat(state) -> dict:
  return {train_state.path_of(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _randomise(model, pattern, seed=1, scale=0.05):
  """Gives the parameters whose path matches `pattern` random values (B = 0 hides bugs)."""
  params = nnx.state(model, nnx.Param)
  flat = nnx.to_flat_state(params)
  key = jax.random.key(seed)
  for i, (path, variable) in enumerate(flat):
    if pattern in train_state.path_of(path):
      variable.set_value(scale * jax.random.normal(jax.random.fold_in(key, i), variable.shape))
  nnx.update(model, nnx.from_flat_state(flat))


# The methods' starting points ------------------------------------------------------------------

def test_lora_with_b_zero_is_exactly_the_base_model():
  batch = _batch()
  base = _logits(_classifier(), batch)
  adapted = _classifier(lora.Lora(rank=4, targets=("attention/(query|key|value|out)$",)))
  np.testing.assert_array_equal(_logits(adapted, batch), base)
  kinds = {type(m).__name__ for _, m in peft.modules(adapted)}
  assert "LoraDense" in kinds


def test_merged_lora_equals_unmerged_and_drops_the_update_path():
  batch = _batch()
  model = _classifier(lora.Lora(rank=4, alpha=16.0, targets=("attention/(query|value|out)$",
                                                               "mlp/wi$")))
  _randomise(model, "lora_b")
  before = _logits(model, batch)
  assert np.abs(before - _logits(_classifier(), batch)).max() > 1e-3  # the update matters
  assert lora.merge(model) == 4
  np.testing.assert_allclose(_logits(model, batch), before, rtol=1e-5, atol=1e-5)
  assert all(m.merged for _, m in peft.modules(model) if isinstance(m, lora.LoraDense))


def test_adapters_at_init_are_within_float_tolerance_of_the_base_model():
  batch = _batch()
  base = _logits(_classifier(), batch)
  adapted = _classifier(adapters.Adapters(bottleneck=8))
  out = _logits(adapted, batch)
  assert np.abs(out - base).max() < 1e-4 * max(1.0, np.abs(base).max())
  # and they do compute something once trained: random adapter weights move the logits
  _randomise(adapted, "adapter_", scale=0.5)
  assert np.abs(_logits(adapted, batch) - base).max() > 0.05 * np.abs(base).max()


def test_prefixes_start_as_zero_keys_and_values_that_only_dilute_attention():
  """At init every layer's prefix keys and values are 0 (reparameterised: the MLP's output
  layer is 0), so a query gives the prefix the weight of a zero score and reads nothing from
  it: the outputs stay close to the base model's instead of being overwritten."""
  batch = _batch()
  base = _logits(_classifier(), batch)
  for reparameterize in (True, False):
    model = _classifier(prefix.Prefix(length=10, bank_size=2, hidden=16,
                                      reparameterize=reparameterize))
    for _, module in peft.modules(model):
      if isinstance(module, prefix.PrefixAttention):
        keys, values = module.prefixes()
        assert keys.shape[-4:-2] == (2, 10) and not np.any(keys) and not np.any(values)
    out = _logits(model, batch)
    assert np.corrcoef(out.ravel(), base.ravel())[0, 1] > 0.9


def test_each_example_of_a_mixed_prefix_batch_runs_its_own_prefix():
  model = _classifier(prefix.Prefix(length=3, bank_size=3, hidden=16))
  _randomise(model, "prefix_mlp", scale=0.3)
  batch = _batch(batch=4)
  index_B = np.array([2, 0, 1, 2], np.int32)
  with peft.bank_index(jnp.asarray(index_B)):
    mixed = _logits(model, batch)
  for b, i in enumerate(index_B):
    one = {k: v[b:b + 1] for k, v in batch.items()}
    with peft.bank_index(jnp.asarray([i])):
      np.testing.assert_allclose(mixed[b], _logits(model, one)[0], rtol=1e-5, atol=1e-6)
  # the prefixes differ, so the rows would differ had the bank been ignored
  with peft.bank_index(jnp.asarray([0, 0, 0, 0])):
    assert np.abs(_logits(model, batch)[0] - mixed[0]).max() > 1e-4


def test_a_mixed_lora_bank_batch_runs_each_examples_own_weights():
  model = _classifier(lora.Lora(rank=2, bank_size=2))
  _randomise(model, "lora_b", scale=0.2)
  batch = _batch(batch=3)
  index_B = np.array([1, 0, 1], np.int32)
  with peft.bank_index(jnp.asarray(index_B)):
    mixed = _logits(model, batch)
  for b, i in enumerate(index_B):
    with peft.bank_index(jnp.asarray([i])):
      one = _logits(model, {k: v[b:b + 1] for k, v in batch.items()})[0]
    np.testing.assert_allclose(mixed[b], one, rtol=1e-5, atol=1e-6)
  with pytest.raises(UserError, match="bank"):
    lora.merge(model)


def test_a_reparameterised_prefix_stored_plain_gives_the_same_outputs():
  model = _classifier(prefix.Prefix(length=4, hidden=16))
  _randomise(model, "prefix_mlp", scale=0.3)
  batch = _batch()
  before = _logits(model, batch)
  assert prefix.plain(model) == 1  # one module: the stacked layers share it
  paths = set(_flat(nnx.state(model, nnx.Param)))
  assert not any("prefix_mlp" in p or "prefix_embed" in p for p in paths)
  assert "encoder/layers/block/attention/prefix_keys" in paths
  np.testing.assert_allclose(_logits(model, batch), before, rtol=1e-5, atol=1e-6)


# Training: what is frozen stays frozen ---------------------------------------------------------

RUN = ["train.feature_converter = None", "bert_classifier.num_classes = 5",
       "BertConfig.vocab_size = 512", "BertConfig.hidden = 64", "BertConfig.num_heads = 4",
       "BertConfig.mlp_dim = 128", "BertConfig.max_positions = 32", "train.batch_size = 8",
       "train.sequence_length = 16", "warmup_linear_decay.warmup_steps = 1",
       "warmup_linear_decay.learning_rate = 1e-2", "peft.Prefix.hidden = 16",
       "peft.Adapters.bottleneck = 8"]


@pytest.mark.parametrize("method", ["lora", "adapters", "prefix"])
def test_frozen_parameters_are_bitwise_unchanged_and_have_no_optimizer_state(method):
  gin.clear_config()
  configure(["models/bert_tiny.gin", "runs/bert_classifier.gin", f"peft/{method}.gin"], RUN)
  setup = trainer.Setup(bound("train.model"), bound("train.loss_fn"), 10)
  state = setup.init_state()
  before = _flat(state.params)
  trainable = {p for p in before if setup.freeze(p)}
  new = {"lora": "lora_", "adapters": "adapter_", "prefix": "prefix_"}[method]
  assert {p for p in trainable if new in p} and {p for p in trainable if "classifier" in p}
  assert all(new in p or p.startswith("classifier/") or "norm/" in p for p in trainable)
  moments = set(_flat(jax.tree.map(lambda x: x, _first_moments(state.opt_state))))
  assert moments == trainable  # Adam's moments exist for the trained parameters only
  for i in range(4):
    state, _ = setup.train_step(state, _batch(batch=8, seed=i))
  after = _flat(state.params)
  for path, x in before.items():
    if path in trainable:
      assert not np.array_equal(after[path], x), f"{path} did not train"
    else:
      np.testing.assert_array_equal(after[path], x, err_msg=f"frozen {path} changed")


def _first_moments(opt_state):
  import optax  # pylint: disable=import-outside-toplevel
  return optax.tree.get(opt_state, "mu")


def test_a_lora_target_that_matches_nothing_lists_the_projections_that_exist():
  with pytest.raises(UserError) as e:
    _classifier(lora.Lora(targets=("attention/qeury$",)))
  message = str(e.value)
  assert "'attention/qeury$' matches no Dense" in message and "\n" not in message
  for name in ("attention/query", "attention/value", "mlp/wi", "classifier"):
    assert name in message


def test_a_label_outside_the_heads_classes_is_refused():
  gin.clear_config()
  configure(["models/bert_tiny.gin", "runs/bert_classifier.gin", "peft/full.gin"], RUN)
  setup = trainer.Setup(bound("train.model"), bound("train.loss_fn"), 10)
  state = setup.init_state()
  batch = _batch(batch=8)
  batch["label"][2] = 7
  with pytest.raises(UserError, match="label 7 is outside the classifier's 5 classes"):
    setup.train_step(state, batch)


# Delta checkpoints -----------------------------------------------------------------------------

BASE = ["BertConfig.max_positions = 64", "train.seed = 0"]  # BERT's own 30,522 WordPieces
FINETUNE = BASE + ["train.task = 'bbc_topic_bert'", "bert_classifier.num_classes = 5",
                   "train.batch_size = 8", "train.sequence_length = 16", "train.num_steps = 2",
                   "train.eval_every = 0", "train.checkpoint_every = 2", "train.log_every = 1",
                   "warmup_linear_decay.warmup_steps = 1",
                   "warmup_linear_decay.learning_rate = 1e-2"]


def _base_run(model_dir, model_gin, bindings, mesh=()):
  """A pretraining run's checkpoint (its initial parameters: enough to be a base)."""
  gin.clear_config()
  configure([model_gin, "objectives/bert.gin", *mesh], bindings)
  setup = trainer.Setup(bound("train.model"), bound("train.loss_fn"), 1,
                        seed=bound("train.seed", 0))
  state = setup.init_state()
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"))
  ckpt.save(0, TrainState(state.step, state.params, {}, state.model_state),
            {"stage": 0, "epoch": 0, "batch": 0})
  ckpt.wait()
  ckpt.close()


def _finetune(model_dir, model_gin, base, method, extra=(), mesh=()):
  gin.clear_config()
  configure([model_gin, "runs/bert_classifier.gin", f"peft/{method}.gin", *mesh],
            FINETUNE + [f"train.init_from = '{base}'", *extra])
  trainer.train(str(model_dir), progress=False)


def _load_logits(model_dir, batch):
  gin.clear_config()
  configure([os.path.join(model_dir, "config.gin")], [])
  model, _, step = loading.load(str(model_dir))
  return _logits(model, batch), step


def _bytes(directory) -> int:
  return sum(os.path.getsize(f) for f in glob.glob(f"{directory}/**", recursive=True)
             if os.path.isfile(f))


def test_a_bert_base_lora_delta_is_under_5_percent_and_composes_to_identical_outputs(tmp_path):
  # fsdp: one sharded copy of BERT-base over the 8 fake devices. Saving 8 replicas took orbax
  # ~14 GB of host memory, enough to take the rest of the suite down with it.
  fsdp = ["meshes/fsdp.gin"]
  base = tmp_path / "base"
  _base_run(base, "models/bert_base.gin", BASE, mesh=fsdp)
  _finetune(tmp_path / "delta", "models/bert_base.gin", base, "lora", mesh=fsdp)
  _finetune(tmp_path / "full_ckpt", "models/bert_base.gin", base, "lora",
            ["train.store_delta = False"], mesh=fsdp)
  delta = json.load(open(tmp_path / "delta" / "delta.json"))
  assert delta["base"] == str(base) and delta["base_step"] == 0
  assert set(delta["stored"]) == {
      "classifier/bias", "classifier/kernel", "encoder/layers/block/attention/query/lora_a",
      "encoder/layers/block/attention/query/lora_b",
      "encoder/layers/block/attention/value/lora_a",
      "encoder/layers/block/attention/value/lora_b"}
  small = _bytes(tmp_path / "delta" / "checkpoints")
  whole = _bytes(tmp_path / "full_ckpt" / "checkpoints")
  assert whole > 0.8 * 110e6 * 4  # bert_base's 110M float32 parameters
  assert small < 0.05 * whole, (small, whole)
  batch = _batch(batch=2, length=16, vocab=8064)
  from_delta, step = _load_logits(tmp_path / "delta", batch)
  from_full, _ = _load_logits(tmp_path / "full_ckpt", batch)
  assert step == 2
  np.testing.assert_array_equal(from_delta, from_full)
  assert np.abs(from_delta - _untrained_logits(batch)).max() > 1e-4  # the delta trained


def _untrained_logits(batch):
  gin.clear_config()
  configure(["models/bert_base.gin"], BASE)
  return _logits(_classifier(cfg=BertConfig(), seed=0), batch)


def test_a_delta_refuses_a_missing_base_or_one_with_other_weights(tmp_path):
  base = tmp_path / "base"
  _base_run(base, "models/bert_tiny.gin", BASE)
  _finetune(tmp_path / "run", "models/bert_tiny.gin", base, "adapters")
  batch = _batch(batch=2, length=16, vocab=8064)
  ok, _ = _load_logits(tmp_path / "run", batch)
  shutil.move(base, tmp_path / "elsewhere")
  with pytest.raises(UserError, match=f"its base run {base} is missing"):
    _load_logits(tmp_path / "run", batch)
  _base_run(base, "models/bert_tiny.gin", BASE[:-1] + ["train.seed = 1"])  # other weights
  with pytest.raises(UserError, match="has other weights than the delta was trained on"):
    _load_logits(tmp_path / "run", batch)
  shutil.rmtree(base)
  shutil.move(tmp_path / "elsewhere", base)
  again, _ = _load_logits(tmp_path / "run", batch)
  np.testing.assert_array_equal(again, ok)


def test_export_stores_a_prefix_run_plain_and_reads_back_to_the_same_outputs(tmp_path):
  from pretrain_jax.peft import export  # pylint: disable=import-outside-toplevel
  base = tmp_path / "base"
  _base_run(base, "models/bert_tiny.gin", BASE)
  _finetune(tmp_path / "run", "models/bert_tiny.gin", base, "prefix",
            ["peft.Prefix.hidden = 32"])
  batch = _batch(batch=2, length=16, vocab=8064)
  trained, _ = _load_logits(tmp_path / "run", batch)
  gin.clear_config()
  configure([str(tmp_path / "run" / "config.gin")], [])
  out = export.export(str(tmp_path / "run"), str(tmp_path / "plain"))
  stored = json.load(open(tmp_path / "plain" / "delta.json"))["stored"]
  assert "encoder/layers/block/attention/prefix_keys" in stored
  assert not any("prefix_mlp" in p or "prefix_embed" in p for p in stored)
  assert _bytes(tmp_path / "plain" / "checkpoints") < _bytes(tmp_path / "run" / "checkpoints")
  plain, step = _load_logits(tmp_path / "plain", batch)
  assert step == out["step"] == 2
  np.testing.assert_allclose(plain, trained, rtol=1e-5, atol=1e-6)


# GPT and T5: the same methods on other families --------------------------------------------------

def _gpt(*methods):
  from pretrain_jax.models import gpt  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  cfg = gpt.GptConfig(vocab_size=61, hidden=32, num_layers=2, num_heads=4, mlp_dim=48,
                      max_positions=64, dropout_rate=0.0, norm="pre_rmsnorm", positions="rope",
                      mlp="swiglu", num_kv_heads=2, use_bias=False, tie_embeddings=False)
  return peft.Finetune(tuple(methods)).wrap(lambda s: gpt.Gpt(cfg, rngs=nnx.Rngs(s)))(0)


def _t5(*methods):
  from pretrain_jax.models import t5  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  cfg = t5.T5Config(vocab_size=50, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_layers=2,
                    dropout_rate=0.0, relative_buckets=8, relative_max_distance=16)
  return peft.Finetune(tuple(methods)).wrap(lambda s: t5.T5(cfg, rngs=nnx.Rngs(s)))(0)


T5_BATCH = {"encoder_input_tokens": jnp.asarray([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0]]),
            "decoder_input_tokens": jnp.asarray([[0, 30, 31, 32], [0, 40, 41, 0]])}
GPT_TOKENS = jnp.asarray(np.random.default_rng(5).integers(1, 61, size=(2, 10)))


def test_lora_at_init_is_exactly_gpt_and_t5_and_adapters_nearly():
  gpt_base, t5_base = np.asarray(_gpt()(GPT_TOKENS)), np.asarray(_t5()(T5_BATCH))
  everything = lora.Lora(rank=2, targets=("attention/(query|key|value|out)$", "mlp/wi_up$"))
  np.testing.assert_array_equal(np.asarray(_gpt(everything)(GPT_TOKENS)), gpt_base)
  t5_lora = _t5(lora.Lora(rank=2, targets=("attention/(query|value)$",)))  # + cross-attention
  assert any("cross_attention/query" in p for p, m in peft.modules(t5_lora)
             if isinstance(m, lora.LoraDense))
  np.testing.assert_array_equal(np.asarray(t5_lora(T5_BATCH)), t5_base)
  for model, base, inputs in ((_gpt(adapters.Adapters(bottleneck=4)), gpt_base, GPT_TOKENS),
                              (_t5(adapters.Adapters(bottleneck=4)), t5_base, T5_BATCH)):
    np.testing.assert_allclose(np.asarray(model(inputs)), base, atol=1e-3 * np.abs(base).max())


def test_lora_reaches_a_module_that_t5s_shared_row_holds_twice():
  from pretrain_jax.models import t5  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  cfg = t5.T5Config(vocab_size=50, d_model=32, num_heads=4, d_kv=8, d_ff=48, num_layers=2,
                    dropout_rate=0.0, relative_buckets=8, relative_max_distance=16,
                    architecture="encoder_decoder_shared")
  factory = lambda s: t5.T5(cfg, rngs=nnx.Rngs(s))
  model = peft.Finetune((lora.Lora(rank=2, targets=("/attention/query$",)),)).wrap(factory)(0)
  encoder_q = model.encoder.layers.block.attention.query
  assert isinstance(encoder_q, lora.LoraDense)
  assert model.decoder.layers.block.attention.query is encoder_q
  np.testing.assert_array_equal(np.asarray(model(T5_BATCH)), np.asarray(factory(0)(T5_BATCH)))


def test_a_prefix_tuned_gpt_decodes_through_its_cache_as_its_full_forward():
  """`generate` reads a prefix-tuned run: the cache holds the tokens, every call reads the
  prefix in front of it."""
  import helpers  # pylint: disable=import-outside-toplevel
  model = _gpt(prefix.Prefix(length=3, hidden=8))
  _randomise(model, "prefix_mlp", scale=0.5)
  tokens = np.asarray(GPT_TOKENS[:1])
  full = np.asarray(model(jnp.asarray(tokens)))[0]
  assert np.abs(full - np.asarray(_gpt()(jnp.asarray(tokens)))[0]).max() > 1e-3
  np.testing.assert_allclose(helpers.cached_logits(model, tokens, prefill=4), full, rtol=1e-5,
                             atol=1e-5)


# Whole-split evaluation ------------------------------------------------------------------------

def test_a_classifier_is_scored_on_every_example_of_a_split_once():
  """101 BBC test articles in batches of 32: the last batch is padded, the pads dropped, and
  each prediction is the row's own argmax."""
  import seqio  # pylint: disable=import-outside-toplevel
  from pretrain_jax.data import glue  # pylint: disable=import-outside-toplevel
  from pretrain_jax.inference import classify  # pylint: disable=import-outside-toplevel
  from pretrain_jax.models import gpt  # pylint: disable=import-outside-toplevel
  gin.clear_config()
  bert = _classifier(cfg=BertConfig(vocab_size=8064, hidden=32, num_layers=1, num_heads=2,
                                    mlp_dim=64, max_positions=32))
  import helpers  # pylint: disable=import-outside-toplevel
  bert = helpers.perturbed(bert, 0)
  gpt_cfg = gpt.GptConfig(vocab_size=8192, hidden=32, num_layers=1, num_heads=2, mlp_dim=64,
                          max_positions=32)
  decoder = helpers.perturbed(gpt.GptClassifier(gpt_cfg, 5, rngs=nnx.Rngs(0)), 0)
  _randomise(decoder, "classifier/bias", scale=0.0)
  _randomise(decoder, "classifier/kernel", scale=5.0)
  for model, task, converter in (
      (bert, "bbc_topic_bert", glue.BertClassificationFeatureConverter()),
      (decoder, "bbc_topic_gpt", None)):
    from pretrain_jax.data import tasks  # pylint: disable=import-outside-toplevel
    converter = converter or tasks.feature_converter(task)
    labels, predictions = classify.predict_split(model, task, 32, converter, "test",
                                                 batch_size=32)
    rows = list(seqio.get_dataset(task, {"inputs": 32, "targets": 32}, converter,
                                  dataset_split="test", shuffle=False,
                                  verbose=False).as_numpy_iterator())
    assert labels.size == predictions.size == len(rows) == 101
    np.testing.assert_array_equal(labels, [r["label"] for r in rows])
    for i in (0, 63, 100):  # a first, a middle and the padded last batch's real row
      one = {k: jnp.asarray(v[None]) for k, v in rows[i].items() if k != "label"}
      if "tokens" in one:
        from pretrain_jax.objectives import classification  # pylint: disable=import-outside-toplevel
        expected = int(jnp.argmax(classification.predict(model, one["tokens"])[0]))
      else:
        expected = int(jnp.argmax(model(one["input_ids"], one["token_type_ids"])[0]))
      assert predictions[i] == expected
    if task == "bbc_topic_gpt":  # a random BERT's pooled [CLS] barely depends on the input
      assert len(set(predictions.tolist())) > 1  # so the rows' order is checked here
