"""Model configs: exact parameter counts and every gin file parses."""

import glob
import os

import gin
import numpy as np
import jax
import pytest
from flax import nnx

from pretrain_jax.config import GIN_DIR, bound, configure
from pretrain_jax.models import bert
from pretrain_jax.training import trainer


def _param_count(module) -> int:
  return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("name, encoder_params, pretraining_params", [
    # BertModel (embeddings + layers + pooler) as published: 110M and 340M class.
    ("bert_base", 109_482_240, 110_106_428),
    ("bert_large", 335_141_888, 336_226_108),
])
def test_exact_parameter_counts(name, encoder_params, pretraining_params):
  gin.clear_config()
  configure([f"models/{name}.gin"], [])
  model = nnx.eval_shape(lambda: bound("train.model")(0))  # shapes only, nothing allocated
  encoder = _param_count(model.encoder) + _param_count(model.pooler)
  print(f"{name}: BertModel {encoder:,}  with MLM + NSP heads {_param_count(model):,}")
  assert encoder == encoder_params == bert.encoder_param_count(model.cfg)
  assert _param_count(model) == pretraining_params


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(GIN_DIR, "**", "*.gin"),
                                                  recursive=True)))
def test_every_gin_file_parses(path):
  gin.clear_config()
  configure([path], [])


def test_sequence_longer_than_positions_is_refused():
  model = bert.BertForPretraining(bert.BertConfig(vocab_size=50, hidden=16, num_layers=1,
                                                  num_heads=2, mlp_dim=32, max_positions=8),
                                  rngs=nnx.Rngs(0))
  ids = jax.numpy.ones((1, 9), "int32")
  with pytest.raises(Exception, match="sequence length 9 exceeds the model's max_positions=8"):
    model.encode(ids, ids * 0)


def test_configs_parse_from_a_directory_with_clashing_folder_names(tmp_path, monkeypatch):
  """A `runs/` or `models/` folder in the working directory must not hijack gin includes."""
  for name in ("runs", "models", "objectives"):
    (tmp_path / name / "x").mkdir(parents=True)
  monkeypatch.chdir(tmp_path)
  gin.clear_config()
  configure(["experiments/bert_tiny_cpu.gin"], [])
  assert bound("train.num_steps") == 900


def test_misspelt_gin_names_get_a_suggestion():
  from pretrain_jax.errors import UserError
  for binding, hint in [("train.num_stepz = 3", "Did you mean 'num_steps'?"),
                        ("BertConfg.hidden = 3", "Did you mean 'BertConfig'?")]:
    gin.clear_config()
    with pytest.raises(UserError, match=hint):
      configure(["experiments/bert_tiny_cpu.gin"], [binding])


def test_bad_settings_are_refused_up_front(tmp_path):
  from pretrain_jax import registry  # noqa: F401  (registers the tasks)
  from pretrain_jax.data import pipeline
  from pretrain_jax.errors import UserError
  from pretrain_jax.objectives.masked_lm import MaskedLmFeatureConverter, MaskingConfig
  with pytest.raises(UserError, match="mask_rate=1.5"):
    MaskingConfig(mask_rate=1.5)
  with pytest.raises(UserError, match="hidden=100 is not divisible by num_heads=3"):
    bert.BertConfig(hidden=100, num_heads=3)
  with pytest.raises(UserError, match="has no split 'dev'; its splits: train, validation, test"):
    pipeline._dataset("bbc_bert", {"inputs": 32, "targets": 32}, MaskedLmFeatureConverter(),
                      "dev", 0, shuffle=False)
  for binding, message in [("train.log_every = 0", "train.log_every=0"),
                           ("train.batch_size = 12", "batch size 12 does not split over")]:
    gin.clear_config()
    configure(["experiments/bert_tiny_cpu.gin"], [binding])
    with pytest.raises(UserError, match=message):
      trainer.train(str(tmp_path / "x"), progress=False)


def test_untied_bert_scores_the_mlm_softmax_with_its_own_output_embeddings():
  """tie_embeddings=False (RemBERT): logits = LN(GELU(W h)) E_outᵀ + b, with E_out a separate
  [V, D] table; the input table no longer enters the softmax."""
  cfg = bert.BertConfig(vocab_size=40, hidden=16, num_layers=1, num_heads=2, mlp_dim=32,
                        max_positions=8, tie_embeddings=False)
  model = bert.BertForPretraining(cfg, rngs=nnx.Rngs(0))
  assert model.mlm_output.embedding.shape == (40, 16)
  h = jax.random.normal(jax.random.key(1), (2, 3, 16))
  t = np.asarray(model.mlm_norm(bert.gelu(model.mlm_transform(h))))
  expected = t @ np.asarray(model.mlm_output.embedding[...]).T + np.asarray(model.mlm_bias[...])
  np.testing.assert_allclose(np.asarray(model.mlm_logits(h)), expected, rtol=1e-5, atol=1e-5)
  tied = bert.BertForPretraining(bert.BertConfig(**{**cfg.__dict__, "tie_embeddings": True}),
                                 rngs=nnx.Rngs(0))
  assert not hasattr(tied, "mlm_output")
