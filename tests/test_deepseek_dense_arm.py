"""DeepSeekConfig.moe_layer_dense_dim (the dense baselines of scripts/moe_vs_dense.py) and
DeepSeek with no MoE layer: the parameter formula still counts the built model, and a dense
model activates all of it but the embedding table's unread rows."""

import dataclasses
import os

import gin
import pytest
from flax import nnx

from helpers import param_count
from pretrain_jax.layers.mlp import GatedMlp
from pretrain_jax.layers.moe import MoeMlp
from pretrain_jax.models import deepseek

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_cfg(**changes):
  gin.clear_config()
  gin.parse_config_files_and_bindings([os.path.join(REPO, "gin_configs/models/deepseek_tiny.gin")],
                                      [], skip_unknown=False)
  with gin.unlock_config():
    cfg = deepseek.DeepSeekConfig()
  return dataclasses.replace(cfg, **changes)


@pytest.mark.parametrize("changes", [dict(moe_layer_dense_dim=325), dict(num_dense_layers=4)])
def test_dense_deepseek_counts_and_activates_every_non_embedding_parameter(changes):
  cfg = _tiny_cfg(**changes)
  model = nnx.eval_shape(lambda: deepseek.DeepSeek(cfg, rngs=nnx.Rngs(0)))
  modules = [m for _, m in nnx.iter_graph(model)]
  assert not any(isinstance(m, MoeMlp) for m in modules)
  widths = sorted({m.wi_gate.kernel.shape[-1] for m in modules if isinstance(m, GatedMlp)})
  assert widths == sorted({704, changes.get("moe_layer_dense_dim", 704)})
  mtp = sum(x.size for p, x in nnx.to_flat_state(nnx.state(model, nnx.Param)) if p[0] == "mtp")
  counts = deepseek.param_counts(cfg)
  assert (counts["total"], counts["mtp_total"]) == (param_count(model) - mtp, mtp)
  assert counts["activated"] == counts["total"] - (cfg.vocab_size - 1) * cfg.hidden


def test_the_matched_dense_arm_activates_what_the_moe_does():
  """1 shared + top-4 routed experts of 64 and the 256 × 16 router: 768 W ≈ 249,856, W = 325."""
  moe, dense = _tiny_cfg(), _tiny_cfg(moe_layer_dense_dim=325)
  a, b = deepseek.param_counts(moe)["activated"], deepseek.param_counts(dense)["activated"]
  assert a - b == 3 * 256  # 768 · 325 is 256 short of the MoE layer's 249,856
