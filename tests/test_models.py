"""Model configs: exact parameter counts and every gin file parses."""

import glob
import os

import gin
import jax
import pytest
from flax import nnx

from pretrain_jax.__main__ import GIN_DIR, _configure
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
  _configure([f"models/{name}.gin"], [])
  model = nnx.eval_shape(trainer._query("train.model"))  # shapes only, nothing allocated
  encoder = _param_count(model.encoder) + _param_count(model.pooler)
  print(f"{name}: BertModel {encoder:,}  with MLM + NSP heads {_param_count(model):,}")
  assert encoder == encoder_params == bert.encoder_param_count(model.cfg)
  assert _param_count(model) == pretraining_params


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(GIN_DIR, "**", "*.gin"),
                                                  recursive=True)))
def test_every_gin_file_parses(path):
  gin.clear_config()
  _configure([path], [])


def test_sequence_longer_than_positions_is_refused():
  model = bert.BertForPretraining(bert.BertConfig(vocab_size=50, hidden=16, num_layers=1,
                                                  num_heads=2, mlp_dim=32, max_positions=8),
                                  rngs=nnx.Rngs(0))
  ids = jax.numpy.ones((1, 9), "int32")
  with pytest.raises(Exception, match="sequence length 9 exceeds the model's max_positions=8"):
    model.encode(ids, ids * 0)
