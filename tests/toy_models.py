"""Toy models for the train-state tests (tests/test_train_state.py), gin-configurable so a
`python -m pretrain_jax train` subprocess can build them from a gin file (`import toy_models`
with tests/ on PYTHONPATH).

ToyLm: logits = E[x] W + b, with a non-gradient forward-pass counter (`StepCounter`) that shifts
the logit of token 0 (so a counter restored wrong changes the loss), an AuxMetric that reports
it, and an AuxLoss `aux_weight · mean(E[x]²)` written by the head. Built only from nnx.Param and
nnx.with_partitioning, so it does not depend on the real layers.
"""

import dataclasses
import os
import pathlib
import time

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.layers.variables import AuxLoss, AuxMetric


# A `train` of the toy LM on the bundled corpus, as gin text; tests add their own learning
# rate, steps, eval and checkpoint cadence. `import toy_models` needs tests/ on sys.path.
TRAIN_GIN = """
import toy_models
train.model = @toy_lm
train.loss_fn = @toy_lm_loss
train.task = 'bbc_lm'
train.feature_converter = @CausalLmFeatureConverter()
CausalLmFeatureConverter.pack = True
warmup_linear_decay.warmup_steps = 2
train.batch_size = 8
train.sequence_length = 16
"""

class StepCounter(nnx.Variable):
  """Non-gradient model state: training forward passes seen so far."""


@dataclasses.dataclass(frozen=True)
class ToyConfig:
  vocab_size: int = 8128
  dim: int = 8
  aux_weight: float = 0.0
  counter_shift: float = 0.01


def _param(rngs, shape, axes, std=0.02):
  init = nnx.with_partitioning(nnx.initializers.normal(std), axes)
  return nnx.Param(init(rngs.params(), shape, jnp.float32))


class Embedding(nnx.Module):
  def __init__(self, cfg: ToyConfig, rngs: nnx.Rngs):
    self.embedding = _param(rngs, (cfg.vocab_size, cfg.dim), ("vocab", "embed"))


class Head(nnx.Module):
  """The output projection; writes the auxiliary loss on its input."""

  def __init__(self, cfg: ToyConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.kernel = _param(rngs, (cfg.dim, cfg.vocab_size), ("embed", "vocab"))
    self.bias = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, ("vocab",))(
        rngs.params(), (cfg.vocab_size,), jnp.float32))
    self.penalty = AuxLoss(jnp.zeros((), jnp.float32))

  def __call__(self, h_BLD):
    self.penalty[...] = self.cfg.aux_weight * penalty(h_BLD)
    return h_BLD @ self.kernel[...] + self.bias[...]


def penalty(h_BLD):
  return jnp.mean(jnp.square(h_BLD))


class ToyLm(nnx.Module):
  def __init__(self, cfg: ToyConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    self.embed = Embedding(cfg, rngs)
    self.head = Head(cfg, rngs)
    self.count = StepCounter(jnp.zeros((), jnp.int32))
    self.count_seen = AuxMetric(jnp.zeros((), jnp.float32))

  def __call__(self, tokens_BL):
    self.count[...] += 1
    self.count_seen[...] = self.count[...].astype(jnp.float32)
    logits_BLV = self.head(self.embed.embedding[...][tokens_BL])
    return logits_BLV.at[..., 0].add(self.cfg.counter_shift * self.count[...])

  def train_flops_per_token(self, seq_len: int, targets_len: int | None = None) -> float:
    del seq_len, targets_len
    return 6.0 * self.cfg.dim * self.cfg.vocab_size


class SparseToyLm(ToyLm):
  """The same network, counting as `info` should: a token reads one row of the embedding."""

  def activated_params(self) -> int:
    return self.cfg.dim + (self.cfg.dim + 1) * self.cfg.vocab_size


@gin.configurable
def toy_sparse_lm(seed: int) -> SparseToyLm:
  return SparseToyLm(ToyConfig(), rngs=nnx.Rngs(seed))


@gin.configurable
def toy_lm(seed: int, vocab_size: int = 8128, dim: int = 8, aux_weight: float = 0.0) -> ToyLm:
  return ToyLm(ToyConfig(vocab_size, dim, aux_weight), rngs=nnx.Rngs(seed))


@gin.configurable
def toy_lm_loss(model, batch, rngs=None):
  """Token-mean next-token cross-entropy over decoder_loss_weights."""
  del rngs
  logits_BLV = model(batch["decoder_input_tokens"])
  jax.debug.callback(pause, model.count[...])
  return cross_entropy(logits_BLV, batch)


def pause(count) -> None:
  """With TOY_PAUSE_AFTER=N, the forward pass after the N-th never returns (after touching
  TOY_PAUSE_MARKER), or with TOY_PAUSE_SECONDS pauses that long once: a run the test kills or
  signals at a known point, whatever the machine's speed. The callback is always traced, so
  the program is the same with and without it."""
  after = os.environ.get("TOY_PAUSE_AFTER")
  if after is not None and int(count) > int(after):
    pathlib.Path(os.environ["TOY_PAUSE_MARKER"]).touch()
    if "TOY_PAUSE_SECONDS" in os.environ:  # a pause once, for a signal to arrive mid-step
      if int(count) == int(after) + 1:
        time.sleep(float(os.environ["TOY_PAUSE_SECONDS"]))
      return
    while True:
      time.sleep(1)


def cross_entropy(logits_BLV, batch):
  weights_BL = batch["decoder_loss_weights"].astype(jnp.float32)
  log_p_BLV = jax.nn.log_softmax(logits_BLV.astype(jnp.float32))
  ce_BL = -jnp.take_along_axis(log_p_BLV, batch["decoder_target_tokens"][..., None], -1)[..., 0]
  ce_sum, count = (ce_BL * weights_BL).sum(), weights_BL.sum()
  return ce_sum / jnp.maximum(count, 1.0), {"loss": (ce_sum, count)}
