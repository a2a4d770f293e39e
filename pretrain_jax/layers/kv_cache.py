"""The key/value cache every decoding model uses (GPT, T5, DeepSeek), stacked like its layers.

`keys[j]` / `values[j]` hold stack j's layers: [layers, B, S, G, K] and [layers, B, S, G, V].
A left-padded batch shares one write index: slot s of row b holds a real token iff
valid_BS[b, s]. Encoder-decoders also keep their encoder output's keys and values per decoder
layer (`context_*`), projected once when decoding starts.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pretrain_jax.layers.attention import cache_mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  valid_BS: jax.Array
  index: jax.Array
  context_keys: tuple[jax.Array, ...] = ()
  context_values: tuple[jax.Array, ...] = ()
  context_valid_BS: jax.Array | None = None

  @classmethod
  def zeros(cls, batch: int, slots: int, layers_per_stack, kv_heads: int, head_dim: int,
            v_head_dim: int | None = None, dtype="float32", **context) -> "KVCache":
    def stacked(size):
      return tuple(jnp.zeros((n, batch, slots, kv_heads, size), dtype) for n in layers_per_stack)
    return cls(stacked(head_dim), stacked(v_head_dim or head_dim),
               jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32), **context)

  def attend(self, valid_BL: jax.Array):
    """(mask [B, 1, L, S] for L new tokens written at `index`, their validity folded in)."""
    return cache_mask(self.valid_BS, self.index, valid_BL)

  def advance(self, keys, values, valid_BS, length: int) -> "KVCache":
    """The cache after a call wrote `length` tokens: new per-stack keys/values and validity."""
    return dataclasses.replace(self, keys=tuple(keys), values=tuple(values), valid_BS=valid_BS,
                               index=self.index + length)

  def map_rows(self, fn) -> "KVCache":
    """Applies fn(array, batch_axis) to every array with a batch axis (beam search reorders
    and repeats rows); the write index is shared."""
    per_layer = lambda arrays: tuple(fn(a, 1) for a in arrays)
    return dataclasses.replace(
        self, keys=per_layer(self.keys), values=per_layer(self.values),
        valid_BS=fn(self.valid_BS, 0), context_keys=per_layer(self.context_keys),
        context_values=per_layer(self.context_values),
        context_valid_BS=(None if self.context_valid_BS is None
                          else fn(self.context_valid_BS, 0)))
