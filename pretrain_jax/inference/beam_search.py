"""Beam search over a key/value cache: the K most probable continuations of each prompt.

Works for any model with the decoder protocol of inference/decoding.py
    init_cache(batch, slots) -> cache          (every array leaf has batch as its leading axis)
    decode(tokens_BL, positions_BL, valid_BL, cache) -> (logits_BLV, cache)
and the same left-padded prompt batch, so a row searches exactly as it would alone.

The prompt is prefilled once per row; the cache is then repeated to B·K rows (row b·K + k is
beam k of prompt b) and each step keeps, per prompt, the K best of the K·V one-token
extensions, reordering the cache rows to follow their parent beams.

Finished beams. A beam that emits `eos_id` is finished: it keeps its log-probability (EOS's
included) and its length, and from then on has a single extension, a padding token at cost 0,
so it stays in the beam for as long as it ranks among the K best and is never extended again.

What is compared. Every hypothesis h is ranked by
    log p(h | prompt) / lp(|h|),    lp(n) = ((5 + n) / 6) ** alpha    (GNMT, Wu et al. 2016)
where |h| counts its generated tokens, EOS included: frozen when it finished, the current step
count while it is alive. All extensions made at one step share a length, so among them this is
plain log-probability order (beam_size=1 is greedy decoding whatever alpha is); the penalty
only weighs a hypothesis that finished earlier against longer ones, offsetting the sum of
log-probabilities' bias towards short outputs. alpha=0 ranks by log-probability alone. The
search stops when every beam of every prompt is finished, or after max_new_tokens steps, when
the alive beams are ranked as they stand.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretrain_jax.errors import UserError
from pretrain_jax.inference.decoding import left_pad, prefill

PAD = 0  # what finished beams append; never returned


class Hypothesis(NamedTuple):
  tokens: list[int]  # generated tokens, EOS excluded
  log_prob: float  # log p(tokens (+ EOS if it finished) | prompt)
  score: float  # log_prob / lp(len(tokens) + finished): what the search ranks by
  finished: bool  # ended with EOS (else it ran to max_new_tokens)


def length_penalty(length, alpha):
  """GNMT's lp(n) = ((5 + n) / 6) ** alpha; lp(1) = 1."""
  return ((5.0 + length) / 6.0) ** alpha


def _repeat_rows(cache, beam_size: int):
  """Batch B -> B·K rows, beam k of row b at b·K + k; the write index is shared."""
  return cache.map_rows(lambda x, axis: jnp.repeat(x, beam_size, axis=axis))


def _take_rows(cache, rows_N):
  """Row n of the result is row rows_N[n] of every array with a batch axis."""
  return cache.map_rows(lambda x, axis: jnp.take(x, rows_N, axis=axis))


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "beam_size",
                                             "eos_id"))
def _beam_search(graphdef, state, prompt_BP, valid_BP, alpha, *, max_new_tokens: int,
                 beam_size: int, eos_id: int | None):
  model, last_logits_BV, cache = prefill(graphdef, state, prompt_BP, valid_BP, max_new_tokens)
  batch, K = prompt_BP.shape[0], beam_size
  vocab = last_logits_BV.shape[-1]
  log_probs_BKV = jnp.repeat(
      jax.nn.log_softmax(last_logits_BV.astype(jnp.float32), axis=-1)[:, None], K, axis=1)
  cache = _repeat_rows(cache, K)
  position_B1 = valid_BP.sum(axis=1, keepdims=True).astype(jnp.int32)
  row_base_B1 = jnp.arange(batch)[:, None] * K
  # Beams 1..K-1 start dead (-inf), so step 0 extends only beam 0 and no beam is a duplicate.
  score_BK = jnp.where(jnp.arange(K) == 0, 0.0, -jnp.inf)[None].repeat(batch, axis=0)
  # only a padding token extends a finished beam, at no cost
  finished_extension_V = jnp.where(jnp.arange(vocab) == PAD, 0.0, -jnp.inf)

  def step(carry):
    i, log_probs_BKV, cache, score_BK, length_BK, done_BK, out_BKN = carry
    cand_BKV = score_BK[..., None] + jnp.where(done_BK[..., None], finished_extension_V,
                                               log_probs_BKV)
    cand_length_BK = jnp.where(done_BK, length_BK, i + 1)
    key_BKV = cand_BKV / length_penalty(cand_length_BK, alpha)[..., None]
    _, flat_BK = jax.lax.top_k(key_BKV.reshape(batch, K * vocab), K)
    parent_BK, token_BK = flat_BK // vocab, (flat_BK % vocab).astype(jnp.int32)
    score_BK = jnp.take_along_axis(cand_BKV.reshape(batch, K * vocab), flat_BK, axis=1)
    length_BK = jnp.take_along_axis(cand_length_BK, parent_BK, axis=1)
    parent_done_BK = jnp.take_along_axis(done_BK, parent_BK, axis=1)
    # -inf: a dead beam (or an impossible token); counting it finished lets the loop end
    done_BK = parent_done_BK | (score_BK == -jnp.inf)
    if eos_id is not None:
      done_BK = done_BK | (token_BK == eos_id)
    out_BKN = jnp.take_along_axis(out_BKN, parent_BK[..., None], axis=1)
    out_BKN = out_BKN.at[:, :, i].set(token_BK)
    cache = _take_rows(cache, (row_base_B1 + parent_BK).reshape(-1))
    logits_N1V, cache = model.decode(
        token_BK.reshape(-1, 1), jnp.broadcast_to(position_B1 + i, (batch, K)).reshape(-1, 1),
        jnp.ones((batch * K, 1), bool), cache)
    log_probs_BKV = jax.nn.log_softmax(logits_N1V[:, 0].astype(jnp.float32),
                                       axis=-1).reshape(batch, K, vocab)
    return i + 1, log_probs_BKV, cache, score_BK, length_BK, done_BK, out_BKN

  def running(carry):
    i, *_, done_BK, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done_BK)

  carry = (jnp.int32(0), log_probs_BKV, cache, score_BK, jnp.zeros((batch, K), jnp.int32),
           jnp.zeros((batch, K), bool), jnp.zeros((batch, K, max_new_tokens), jnp.int32))
  i, _, _, score_BK, length_BK, done_BK, out_BKN = jax.lax.while_loop(running, step, carry)
  length_BK = jnp.where(done_BK, length_BK, i)  # alive beams are as long as the search ran
  normalized_BK = score_BK / length_penalty(length_BK, alpha)
  return out_BKN, score_BK, normalized_BK, length_BK, i


def beam_search_all(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    *, beam_size: int = 4, alpha: float = 0.6,
                    eos_id: int | None = None) -> list[list[Hypothesis]]:
  """Every surviving beam of each prompt, best first by (length-normalised) score.

  Beams that never became possible (beam_size larger than the number of continuations) are
  left out, so a row may hold fewer than beam_size hypotheses.
  """
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens={max_new_tokens}; it must be >= 1")
  if beam_size < 1:
    raise UserError(f"beam_size={beam_size}; it must be >= 1")
  if alpha < 0:
    raise UserError(f"alpha={alpha}; it must be >= 0 (0: no length penalty)")
  tokens, valid = left_pad(prompts)
  graphdef, state = nnx.split(model)
  out, log_prob, score, length, steps = jax.device_get(_beam_search(
      graphdef, state, tokens, valid, jnp.float32(alpha), max_new_tokens=max_new_tokens,
      beam_size=beam_size, eos_id=eos_id))
  results = []
  for b in range(len(prompts)):
    hypotheses = []
    for k in np.argsort(-score[b], kind="stable"):
      if log_prob[b, k] == -np.inf:
        continue
      row = out[b, k, :int(length[b, k])].tolist()
      finished = eos_id is not None and eos_id in row
      if finished:
        row = row[:row.index(eos_id)]
      hypotheses.append(Hypothesis(row, float(log_prob[b, k]), float(score[b, k]), finished))
    results.append(hypotheses)
  return results


def beam_search(model: nnx.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                beam_size: int = 4, alpha: float = 0.6,
                eos_id: int | None = None) -> list[list[int]]:
  """The best continuation of each prompt (EOS not included); see the module docstring."""
  return [hypotheses[0].tokens for hypotheses in beam_search_all(
      model, prompts, max_new_tokens, beam_size=beam_size, alpha=alpha, eos_id=eos_id)]
