"""Prefix tuning (Li & Liang 2021): trained key/value vectors in front of every attention's
own, the model frozen.

    attention(Q, [P_k; K], [P_v; V])      P_k, P_v [prefix, kv heads, head size] per layer

Every query may read the prefix. Training the prefixes directly is unstable, so the paper
reparameterises them, P = MLP(P') with a smaller P'; `reparameterize=True` does that (one MLP
per layer, a departure: the paper's one MLP emits every layer's), and `plain` turns a trained
module into the plain prefixes it computes, the only thing inference needs.
With `bank_size` > 1 each batch row reads its own prefix (peft.bank_index): one batch runs
several tuned models.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import gin
import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax import peft
from pretrain_jax.errors import UserError
from pretrain_jax.layers.attention import MultiHeadAttention, SegmentMask


class PrefixAttention(MultiHeadAttention):
  """A `MultiHeadAttention` (same projections, same paths) whose queries also read a prefix."""

  def __init__(self, base: MultiHeadAttention, length: int, bank_size: int,
               reparameterize: bool, hidden: int, *, rngs: nnx.Rngs | None):
    peft.adopt(self, base)
    heads, head_dim = base.key.out_features
    v_head_dim = base.value.out_features[1]
    width = math.prod(base.key.in_features)
    lead = peft.leading_axes(base.key.kernel, 3)
    self.prefix_shape = (length, heads, head_dim, v_head_dim)
    normal = lambda std: nnx.initializers.truncated_normal(std)
    if reparameterize:  # P = W₂ tanh(W₁ P' + b₁) + b₂
      out = heads * (head_dim + v_head_dim)
      self.prefix_embed = peft.new_param(rngs, normal(1.0), lead, (bank_size, length, width),
                                         (None, None, "embed"))
      self.prefix_mlp_in = peft.new_param(rngs, normal(width ** -0.5), lead, (width, hidden),
                                          ("embed", None))
      self.prefix_mlp_in_bias = peft.new_param(rngs, nnx.initializers.zeros, lead, (hidden,),
                                               (None,))
      # zero, as LoRA's B: the prefixes start as zero keys and values, which dilute each
      # attention's weights but add nothing to its output, so training starts from the base
      # model's function rather than from random prefixes' (the paper initialises from real
      # words' activations for the same reason).
      self.prefix_mlp_out = peft.new_param(rngs, nnx.initializers.zeros, lead, (hidden, out),
                                           (None, None))
      self.prefix_mlp_out_bias = peft.new_param(rngs, nnx.initializers.zeros, lead, (out,),
                                                (None,))
    else:
      self.prefix_keys = peft.new_param(rngs, nnx.initializers.zeros, lead,
                                        (bank_size, length, heads, head_dim),
                                        (None, None, "heads", "kv"))
      self.prefix_values = peft.new_param(rngs, nnx.initializers.zeros, lead,
                                          (bank_size, length, heads, v_head_dim),
                                          (None, None, "heads", "kv"))
    self.reparameterize = reparameterize

  def prefixes(self):
    """(keys [..., N, P, G, K], values [..., N, P, G, V]) of every bank entry."""
    if not self.reparameterize:
      return self.prefix_keys[...], self.prefix_values[...]
    length, heads, head_dim, v_head_dim = self.prefix_shape
    h = jnp.tanh(jnp.einsum("...npd,...dh->...nph", self.prefix_embed[...],
                            self.prefix_mlp_in[...])
                 + self.prefix_mlp_in_bias[...][..., None, None, :])
    kv = (jnp.einsum("...nph,...ho->...npo", h, self.prefix_mlp_out[...])
          + self.prefix_mlp_out_bias[...][..., None, None, :])
    keys = kv[..., :heads * head_dim].reshape(*kv.shape[:-1], heads, head_dim)
    values = kv[..., heads * head_dim:].reshape(*kv.shape[:-1], heads, v_head_dim)
    return keys, values

  def read_keys(self, k_BSGK, v_BSGV, mask_B1LS, bias_BHLS):
    batch, length = k_BSGK.shape[0], self.prefix_shape[0]
    keys_NPGK, values_NPGV = self.prefixes()
    pk_BPGK = peft.gather_bank(keys_NPGK, batch).astype(k_BSGK.dtype)
    pv_BPGV = peft.gather_bank(values_NPGV, batch).astype(v_BSGV.dtype)
    if isinstance(mask_B1LS, SegmentMask):
      mask_B1LS = mask_B1LS.dense()
    if mask_B1LS is not None:  # every query reads the whole prefix
      mask_B1LS = jnp.concatenate(
          [jnp.ones((*mask_B1LS.shape[:-1], length), bool), mask_B1LS], axis=-1)
    if bias_BHLS is not None:
      bias_BHLS = jnp.concatenate(
          [jnp.zeros((*bias_BHLS.shape[:-1], length), bias_BHLS.dtype), bias_BHLS], axis=-1)
    return (jnp.concatenate([pk_BPGK, k_BSGK], axis=1),
            jnp.concatenate([pv_BPGV, v_BSGV], axis=1), mask_B1LS, bias_BHLS)

  def to_plain(self) -> None:
    """Replaces the reparameterisation by the prefixes it computes (same outputs)."""
    if not self.reparameterize:
      return
    keys, values = self.prefixes()
    axes = lambda v: v.get_metadata().get("out_sharding")
    lead = axes(self.prefix_embed)[:-3]
    self.prefix_keys = nnx.Param(keys, out_sharding=(*lead, None, None, "heads", "kv"))
    self.prefix_values = nnx.Param(values, out_sharding=(*lead, None, None, "heads", "kv"))
    for name in ("prefix_embed", "prefix_mlp_in", "prefix_mlp_in_bias", "prefix_mlp_out",
                 "prefix_mlp_out_bias"):
      delattr(self, name)
    self.reparameterize = False


@gin.configurable(module="peft")
@dataclasses.dataclass(frozen=True)
class Prefix:
  """Prefixes of `length` vectors on every MultiHeadAttention whose path matches `targets`
  (default: all of them, self- and cross-attention)."""
  length: int = 10
  bank_size: int = 1
  reparameterize: bool = True
  hidden: int = 512  # the reparameterising MLP's width (the paper: 512)
  targets: Sequence[str] = ("attention$",)

  def apply(self, module: nnx.Module, rngs: nnx.Rngs) -> None:
    if self.length < 1 or self.bank_size < 1:
      raise UserError(f"peft.Prefix: length={self.length} and bank_size={self.bank_size} "
                      "must be >= 1")
    for path in peft.select(module, tuple(self.targets), MultiHeadAttention, "peft.Prefix"):
      base = peft.module_at(module, path)
      peft.replace(module, path, PrefixAttention(base, self.length, self.bank_size,
                                                 self.reparameterize, self.hidden, rngs=rngs))

  def trainable(self, module: nnx.Module) -> tuple[str, ...]:
    del module
    return ("/prefix_[a-z_]+$",)


def plain(module: nnx.Module) -> int:
  """Every reparameterised prefix replaced by its plain keys and values; returns how many."""
  done = 0
  for _, m in list(peft.modules(module)):
    if isinstance(m, PrefixAttention) and m.reparameterize:
      m.to_plain()
      done += 1
  return done
