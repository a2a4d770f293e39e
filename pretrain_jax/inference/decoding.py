"""Autoregressive decoding over a key/value cache, and scoring continuations.

Shared by every family. A model decodes if it has
    init_cache(batch, slots) -> cache
    decode(tokens_BL, positions_BL, valid_BL, cache, last_only=False) -> (logits_BLV, cache)
(`last_only`: logits of the last position only, [B, 1, V] — all a prefill needs; the protocol
is `models.protocol.Decoder`), its cache a `layers.kv_cache.KVCache` (beam search reorders its
rows).
Prompts of different lengths are left-padded so that all rows write the same cache slot at
each step; padded slots are marked invalid and never attended to, and positions count only
real tokens, so a padded row decodes exactly as it would alone.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretrain_jax.errors import UserError
from pretrain_jax.inference.sampling import Sampling


def left_pad(prompts: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """[B, P] token ids and validity, every prompt ending at the last column."""
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("every prompt needs at least one token")
  width = max(len(p) for p in prompts)
  tokens = np.zeros((len(prompts), width), np.int32)
  valid = np.zeros((len(prompts), width), bool)
  for row, prompt in enumerate(prompts):
    tokens[row, width - len(prompt):] = prompt
    valid[row, width - len(prompt):] = True
  return tokens, valid


def prefill(graphdef, state, prompt_BP, valid_BP, max_new_tokens: int):
  """The model, and the left-padded prompts run through a fresh cache with room for
  `max_new_tokens` more: (model, last position's logits [B, V], cache). Positions count real
  tokens only, so padding shifts nothing."""
  model = nnx.merge(graphdef, state)
  cache = model.init_cache(prompt_BP.shape[0], prompt_BP.shape[1] + max_new_tokens)
  positions_BP = jnp.maximum(jnp.cumsum(valid_BP, axis=1) - 1, 0)
  logits_B1V, cache = model.decode(prompt_BP, positions_BP, valid_BP, cache, last_only=True)
  return model, logits_B1V[:, -1], cache


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "sampling",
                                             "eos_id"))
def _generate(graphdef, state, prompt_BP, valid_BP, key, *, max_new_tokens: int,
              sampling: Sampling, eos_id: int | None):
  model, last_logits_BV, cache = prefill(graphdef, state, prompt_BP, valid_BP, max_new_tokens)
  batch = prompt_BP.shape[0]
  ones_B1 = jnp.ones((batch, 1), bool)

  def step(carry):
    i, logits_BV, cache, position_B, out_BN, done_B, key = carry
    key, sample_key = jax.random.split(key)
    token_B = jnp.where(done_B, 0, sampling(logits_BV, sample_key))
    out_BN = out_BN.at[:, i].set(token_B)
    if eos_id is not None:
      done_B = done_B | (token_B == eos_id)
    logits_B1V, cache = model.decode(token_B[:, None], position_B[:, None], ones_B1, cache)
    return i + 1, logits_B1V[:, 0], cache, position_B + 1, out_BN, done_B, key

  def running(carry):
    i, *_, done_B, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_B)

  carry = (jnp.int32(0), last_logits_BV, cache, valid_BP.sum(axis=1).astype(jnp.int32),
           jnp.zeros((batch, max_new_tokens), jnp.int32), jnp.zeros((batch,), bool), key)
  carry = jax.lax.while_loop(running, step, carry)
  return carry[4], carry[0]


def generate(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             sampling: Sampling = Sampling(), eos_id: int | None = None,
             seed: int = 0) -> list[list[int]]:
  """Continues each prompt by up to `max_new_tokens` tokens (stopping after EOS, which is
  not returned). Prefill runs the whole padded prompt batch at once, then one token a step."""
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens={max_new_tokens}; it must be >= 1")
  tokens, valid = left_pad(prompts)
  graphdef, state = nnx.split(model)
  out, steps = _generate(graphdef, state, tokens, valid, jax.random.key(seed),
                         max_new_tokens=max_new_tokens, sampling=sampling, eos_id=eos_id)
  out = np.asarray(out)[:, :int(steps)]
  results = []
  for row in out:
    row = row.tolist()
    if eos_id is not None and eos_id in row:
      row = row[:row.index(eos_id)]
    results.append(row)
  return results


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _token_log_probs(graphdef, state, tokens_BL, targets_BL):
  logits_BLV = nnx.merge(graphdef, state)(tokens_BL).astype(jnp.float32)
  log_probs_BLV = jax.nn.log_softmax(logits_BLV, axis=-1)
  return jnp.take_along_axis(log_probs_BLV, targets_BL[..., None], axis=-1)[..., 0]


def score(model: nnx.Module, contexts: Sequence[Sequence[int]],
          continuations: Sequence[Sequence[int]], batch_size: int = 32) -> np.ndarray:
  """log p(continuation | context), summed over the continuation's tokens, for each pair.

  Rows are right-padded to a multiple of 16 tokens (few distinct shapes, few compilations).
  """
  if len(contexts) != len(continuations):
    raise ValueError("one continuation per context")
  graphdef, state = nnx.split(model)
  scores = np.zeros(len(contexts), np.float64)
  for start in range(0, len(contexts), batch_size):
    pairs = list(zip(contexts, continuations))[start:start + batch_size]
    sequences = [list(c) + list(t) for c, t in pairs]
    width = -(-max(len(s) for s in sequences) // 16) * 16
    tokens = np.zeros((batch_size, width), np.int32)
    weights = np.zeros((batch_size, width), np.float32)
    for row, ((context, continuation), seq) in enumerate(zip(pairs, sequences)):
      if not context or not continuation:
        raise UserError("scoring needs a non-empty context and continuation")
      tokens[row, :len(seq)] = seq
      weights[row, len(context) - 1:len(seq) - 1] = 1.0  # positions predicting the continuation
    targets = np.concatenate([tokens[:, 1:], np.zeros((batch_size, 1), np.int32)], axis=1)
    log_probs = np.asarray(_token_log_probs(graphdef, state, tokens, targets))
    scores[start:start + len(pairs)] = (log_probs * weights).sum(axis=1)[:len(pairs)]
  return scores
