"""BERT (Devlin et al. 2018): a post-LN Transformer encoder with MLM and NSP heads.

    h⁰ = LN(E_tok[x] + E_pos[i] + E_type[s])
    a  = LN(hˡ + Dropout(MHA(hˡ)))
    hˡ⁺¹ = LN(a + Dropout(W₂ GELU(W₁ a)))
    MLM:  softmax(LN(GELU(W h)) E_tokᵀ + b)     (output tied to the input embeddings;
                                               `tie_embeddings=False`: its own E_out)
    NSP:  softmax(W_nsp tanh(W_pool h_[CLS]))
    finetuning (§4.1): softmax(W_c Dropout(tanh(W_pool h_[CLS])))   (C = 1: a regression)

RoBERTa and SpanBERT are the same network trained differently (objectives/masked_lm.py).
"""

import dataclasses
import functools
import math

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.errors import UserError
from pretrain_jax.layers.attention import MultiHeadAttention, SegmentMask
from pretrain_jax.layers.linear import Dense, Embed, LayerNorm
from pretrain_jax.layers.mlp import Mlp
from pretrain_jax.layers.stack import Stack, check_stack_options
from pretrain_jax.layers.sharding import constrain

gelu = functools.partial(jax.nn.gelu, approximate=False)  # BERT uses the exact erf GELU


@gin.configurable
@dataclasses.dataclass(frozen=True)
class BertConfig:
  vocab_size: int = 30522
  hidden: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  max_positions: int = 512
  type_vocab_size: int = 2
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  layer_norm_eps: float = 1e-12
  init_std: float = 0.02
  # False: the MLM softmax gets its own output embeddings (RemBERT, Chung et al. 2021). Tied,
  # a small model's rare-word input embeddings drift into one direction (Gao et al. 2019;
  # docs/finetuning.md measures it), which finetuning then has to undo.
  tie_embeddings: bool = True
  dtype: str = "float32"  # compute dtype; parameters stay float32 (master weights)
  scan_layers: bool = True  # False: the same stacked parameters in a Python loop (debugging)
  scan_unroll: int | bool = 1  # layers per scan iteration; True: unrolled (faster on CPU)
  remat_policy: str = "none"  # or a jax.checkpoint_policies name, e.g. 'nothing_saveable'

  def __post_init__(self):
    check_stack_options("BertConfig", self.remat_policy, self.scan_unroll)
    if self.hidden % self.num_heads:
      raise UserError(f"BertConfig.hidden={self.hidden} is not divisible by "
                      f"num_heads={self.num_heads}")


class BertLayer(nnx.Module):
  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    common = dict(init_std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    self.attention = MultiHeadAttention(cfg.hidden, cfg.num_heads,
                                        dropout_rate=cfg.attention_dropout_rate, **common)
    self.attention_norm = LayerNorm(cfg.hidden, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                                    rngs=rngs)
    self.mlp = Mlp(cfg.hidden, cfg.mlp_dim, gelu, **common)
    self.mlp_norm = LayerNorm(cfg.hidden, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                              rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)

  def __call__(self, h_BLD, mask_B11L, cache=None, rngs=None):
    del cache  # an encoder decodes nothing
    det = rngs is None
    a_BLD = self.attention_norm(
        h_BLD + self.dropout(self.attention(h_BLD, mask_B11L, rngs=rngs)[0], rngs=rngs,
                             deterministic=det))
    h_BLD = self.mlp_norm(a_BLD + self.dropout(self.mlp(a_BLD), rngs=rngs, deterministic=det))
    return constrain(h_BLD, ("batch", "length", "act_embed")), None


class BertEncoder(nnx.Module):
  """Embeddings and the layer stack: `BertModel` without the pooler."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    common = dict(init_std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    self.token_embed = Embed(cfg.vocab_size, cfg.hidden, ("vocab", "embed"), **common)
    self.position_embed = Embed(cfg.max_positions, cfg.hidden, ("position", "embed"), **common)
    self.type_embed = Embed(cfg.type_vocab_size, cfg.hidden, ("token_type", "embed"), **common)
    self.embed_norm = LayerNorm(cfg.hidden, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                                rngs=rngs)
    self.dropout = nnx.Dropout(cfg.dropout_rate)
    self.layers = Stack(lambda r: BertLayer(cfg, rngs=r), cfg.num_layers, rngs=rngs,
                        scan=cfg.scan_layers, unroll=cfg.scan_unroll,
                        remat_policy=cfg.remat_policy)

  def __call__(self, input_ids_BL, segment_ids_BL, *, pad_id: int = 0, rngs=None):
    length = input_ids_BL.shape[1]
    if length > self.cfg.max_positions:
      raise UserError(f"sequence length {length} exceeds the model's max_positions="
                      f"{self.cfg.max_positions}: shorten the sequence or raise "
                      "BertConfig.max_positions")
    h_BLD = (self.token_embed(input_ids_BL) + self.position_embed(jnp.arange(length))[None]
             + self.type_embed(segment_ids_BL))
    h_BLD = self.dropout(self.embed_norm(h_BLD), rngs=rngs, deterministic=rngs is None)
    h_BLD = constrain(h_BLD, ("batch", "length", "act_embed"))
    mask = SegmentMask(jnp.where(input_ids_BL != pad_id, 1, 0))  # padding_mask, unbuilt
    h_BLD, _ = self.layers(h_BLD, mask, rngs=rngs)
    return h_BLD


class BertForPretraining(nnx.Module):
  """Encoder + pooler + the two pretraining heads."""

  def __init__(self, cfg: BertConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    common = dict(init_std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    self.encoder = BertEncoder(cfg, rngs=rngs)
    self.pooler = Dense(cfg.hidden, cfg.hidden, ("embed", "mlp"), role="head", **common)
    self.mlm_transform = Dense(cfg.hidden, cfg.hidden, ("embed", "mlp"), role="head", **common)
    self.mlm_norm = LayerNorm(cfg.hidden, epsilon=cfg.layer_norm_eps, dtype=cfg.dtype,
                              rngs=rngs)
    self.mlm_bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("vocab",))(
        rngs.params(), (cfg.vocab_size,), jnp.float32))
    if not cfg.tie_embeddings:
      self.mlm_output = Embed(cfg.vocab_size, cfg.hidden, ("vocab", "embed"), **common)
    self.nsp = Dense(cfg.hidden, 2, ("mlp", None), role="head", **common)

  def encode(self, inputs_BL, segment_ids_BL, rngs=None):
    return self.encoder(inputs_BL, segment_ids_BL, rngs=rngs)

  def mlm_logits(self, h_BPD):
    """Vocabulary logits for the gathered (masked) positions only: P ≪ L saves most FLOPs."""
    t_BPD = self.mlm_norm(gelu(self.mlm_transform(h_BPD)))
    output = self.encoder.token_embed if self.cfg.tie_embeddings else self.mlm_output
    logits_BPV = output.attend(t_BPD) + self.mlm_bias[...]
    return constrain(logits_BPV, ("batch", "length", "act_vocab"))

  def train_flops_per_token(self, seq_len: int, targets_len: int | None = None) -> float:
    del targets_len  # one sequence
    return flops_per_token(self.cfg, seq_len, predictions=math.ceil(0.15 * seq_len))

  def nsp_logits(self, h_BLD):
    pooled_BD = jnp.tanh(self.pooler(h_BLD[:, 0]))
    return self.nsp(pooled_BD)


class BertClassifier(nnx.Module):
  """Sequence classification (or regression, `num_classes=1`) on the pooled [CLS]: the
  pretrained encoder and pooler keep their paths (`train.init_from` loads them), the
  classifier is new."""
  finetuning_head = ("^classifier/",)  # what trains beside a parameter-efficient method

  def __init__(self, cfg: BertConfig, num_classes: int, *, rngs: nnx.Rngs):
    if num_classes < 1:
      raise UserError(f"bert_classifier.num_classes={num_classes}; it must be >= 1 "
                      "(1: regression)")
    self.cfg, self.num_classes = cfg, num_classes
    common = dict(init_std=cfg.init_std, dtype=cfg.dtype, rngs=rngs)
    self.encoder = BertEncoder(cfg, rngs=rngs)
    self.pooler = Dense(cfg.hidden, cfg.hidden, ("embed", "mlp"), role="head", **common)
    self.dropout = nnx.Dropout(cfg.dropout_rate)
    self.classifier = Dense(cfg.hidden, num_classes, ("mlp", None), role="head", **common)

  def __call__(self, input_ids_BL, token_type_ids_BL, rngs=None):
    """Logits [B, C]."""
    h_BLD = self.encoder(input_ids_BL, token_type_ids_BL, rngs=rngs)
    pooled_BD = jnp.tanh(self.pooler(h_BLD[:, 0]))
    return self.classifier(self.dropout(pooled_BD, rngs=rngs, deterministic=rngs is None))

  def train_flops_per_token(self, seq_len: int, targets_len: int | None = None) -> float:
    del targets_len
    return flops_per_token(self.cfg, seq_len, predictions=0)


@gin.configurable
def bert_classifier(seed: int, cfg: BertConfig = gin.REQUIRED,
                    num_classes: int = gin.REQUIRED) -> BertClassifier:
  return BertClassifier(cfg, num_classes, rngs=nnx.Rngs(seed))


@gin.configurable
def bert_for_pretraining(seed: int, cfg: BertConfig = gin.REQUIRED) -> BertForPretraining:
  """The trainer's model factory: `factory(seed) -> module` (the seed comes from train.seed)."""
  return BertForPretraining(cfg, rngs=nnx.Rngs(seed))


def encoder_param_count(cfg: BertConfig) -> int:
  """Parameters of `BertModel` as the paper counts them: embeddings, layers and pooler."""
  d, f, l = cfg.hidden, cfg.mlp_dim, cfg.num_layers
  embeddings = (cfg.vocab_size + cfg.max_positions + cfg.type_vocab_size) * d + 2 * d
  layer = 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d
  return embeddings + l * layer + d * d + d


def flops_per_token(cfg: BertConfig, seq_len: int, predictions: int) -> float:
  """Training FLOPs per input token (6 × matmul MACs per token, attention included)."""
  d, f, l = cfg.hidden, cfg.mlp_dim, cfg.num_layers
  layer_macs = 4 * d * d + 2 * d * f + 2 * seq_len * d  # projections, MLP, QKᵀ and AV
  head_macs = (predictions / seq_len) * (d * d + d * cfg.vocab_size)  # only gathered positions
  return 6.0 * (l * layer_macs + head_macs + d * d / seq_len)
