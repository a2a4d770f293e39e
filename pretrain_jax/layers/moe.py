"""DeepSeekMoE: shared experts plus fine-grained routed experts (Dai et al. 2024; DeepSeek-V3
§2.1.2), with the V3 router and its auxiliary-loss-free balancing.

    h'_t   = Σ_{i ≤ N_s} FFN_i^(s)(u_t) + Σ_{i ≤ N_r} g_i,t FFN_i^(r)(u_t)     (SwiGLU experts)
    s_i,t  = sigmoid(u_t · e_i)                      ('softmax' router: softmax_i(u_t · e_i))
    chosen = TopK_r(s_i,t + b_i) among the topk_group best of n_group expert groups, a group
             ranked by the sum of its two highest (biased) scores; b only selects
    g_i,t  = routed_scale · s_i,t / Σ_{j ∈ chosen} s_j,t    for i ∈ chosen, else 0
    b_i   ← b_i + γ · sign(mean_j load_j − load_i)    after every training pass, no gradient

Optional balance loss, α Σ_i f_i P_i with f_i = N_r / (K_r T) · #{t: i ∈ chosen_t} and
P_i = mean_t s_i,t / Σ_j s_j,t, over each sequence (V3's sequence-wise loss, eq. 17–20) or
over the batch (Switch/GShard, with the softmax router). A capacity factor drops the slots
past ceil(factor · T K_r / N_r) per expert; None (the default) is dropless.

Dispatch, one answer three ways: 'dense' runs every expert on every token (a reference for
tests); 'dropless' sorts the token-expert slots by expert and runs grouped matmuls, either
`jax.lax.ragged_dot` (TPU/GPU kernels) or in row blocks of one expert each, padded per expert
(`grouped_swiglu`: XLA:CPU's ragged_dot computes every group for every row);
'expert_parallel' shards the experts over the mesh axis `expert` and, in `shard_map`, sends
each slot to the rank holding its expert with a capacity-padded all-to-all, runs the local
experts dropless, and sends the results back. Routing and statistics stay outside, global.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import gin
import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from pretrain_jax.errors import UserError
from pretrain_jax.layers.linear import Dense, normal
from pretrain_jax.layers.mlp import GatedMlp
from pretrain_jax.layers.precision import dot_general_for
from pretrain_jax.layers.sharding import active_spec, constrain, target_platform
from pretrain_jax.layers.variables import AuxLoss, AuxMetric

ROUTERS = ("sigmoid", "softmax")
BALANCE_LOSSES = ("none", "sequence", "batch")
DISPATCHES = ("dropless", "dense", "expert_parallel")
GROUPED_MATMULS = (None, "ragged_dot", "blocks")


class RouterBias(nnx.Variable):
  """b_i: selection-only expert bias, updated by the balancing rule (not a gradient)."""


class BalanceUpdates(nnx.Variable):
  """How many training passes have updated the bias (γ turns to 0 after `bias_update_steps`)."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MoeConfig:
  num_experts: int = 16  # N_r, routed
  num_shared_experts: int = 1  # N_s
  top_k: int = 4  # K_r
  expert_dim: int = 256  # each expert's SwiGLU width (the shared experts' too)
  num_groups: int = 1  # n_group; 1: no group limit
  top_groups: int = 1  # topk_group: groups a token may route into
  routed_scale: float = 1.0
  router: str = "sigmoid"  # or 'softmax'
  normalize_gates: bool = True  # V3: the chosen s_i,t sum to 1 (before routed_scale)
  bias_update_rate: float = 0.001  # γ; 0 turns the bias balancing off
  bias_update_steps: int | None = None  # after this many training passes γ is 0 (V3: late)
  balance_loss: str = "none"  # 'sequence' (V3, α = 1e-4) or 'batch' (Switch/GShard)
  balance_alpha: float = 1e-4
  capacity_factor: float | None = None  # None: dropless
  dispatch: str = "dropless"  # or 'dense' (reference), 'expert_parallel' (over mesh `expert`)
  # expert_parallel: rows each rank sends each other rank, as a share of its T·K slots / ranks;
  # None sends up to all T·K (never drops, costs ranks × the memory)
  exchange_capacity: float | None = None

  def __post_init__(self):
    checks = [
        (self.router in ROUTERS, f"router={self.router!r}; valid: {ROUTERS}"),
        (self.balance_loss in BALANCE_LOSSES,
         f"balance_loss={self.balance_loss!r}; valid: {BALANCE_LOSSES}"),
        (self.dispatch in DISPATCHES, f"dispatch={self.dispatch!r}; valid: {DISPATCHES}"),
        (0 < self.top_k <= self.num_experts,
         f"top_k={self.top_k} must be in 1 … num_experts={self.num_experts}"),
        (self.num_experts % self.num_groups == 0,
         f"num_groups={self.num_groups} does not divide num_experts={self.num_experts}"),
        (0 < self.top_groups <= self.num_groups,
         f"top_groups={self.top_groups} must be in 1 … num_groups={self.num_groups}"),
        (self.top_k <= self.top_groups * self.num_experts // self.num_groups,
         f"top_k={self.top_k} exceeds the {self.top_groups} groups' "
         f"{self.top_groups * self.num_experts // self.num_groups} experts"),
        (self.capacity_factor is None or self.capacity_factor > 0,
         f"capacity_factor={self.capacity_factor} must be positive (or None: dropless)"),
    ]
    for ok, message in checks:
      if not ok:
        raise UserError(f"MoeConfig.{message}")


# Routing ---------------------------------------------------------------------------------------


def route(scores_TE: jax.Array, bias_E: jax.Array, cfg: MoeConfig):
  """(chosen experts [T, K], their gates [T, K]) from affinities s and the selection bias b."""
  tokens, experts = scores_TE.shape
  choice_TE = scores_TE + bias_E
  if cfg.num_groups > 1:
    grouped_TGe = choice_TE.reshape(tokens, cfg.num_groups, -1)
    group_score_TG = jax.lax.top_k(grouped_TGe, min(2, grouped_TGe.shape[-1]))[0].sum(-1)
    _, groups_TK = jax.lax.top_k(group_score_TG, cfg.top_groups)
    eligible_TG = jax.nn.one_hot(groups_TK, cfg.num_groups, dtype=bool).any(-2)
    eligible_TE = jnp.repeat(eligible_TG, experts // cfg.num_groups, axis=-1)
    choice_TE = jnp.where(eligible_TE, choice_TE, -jnp.inf)
  _, experts_TK = jax.lax.top_k(choice_TE, cfg.top_k)
  gates_TK = jnp.take_along_axis(scores_TE, experts_TK, axis=-1)
  if cfg.normalize_gates:
    gates_TK = gates_TK / jnp.sum(gates_TK, axis=-1, keepdims=True)
  return experts_TK, gates_TK * cfg.routed_scale


def balance_loss(scores_NTE: jax.Array, experts_NTK: jax.Array, valid_NT: jax.Array,
                 alpha: float) -> jax.Array:
  """α Σ_i f_i P_i, averaged over the N groups of T tokens (sequences, or one batch)."""
  experts = scores_NTE.shape[-1]
  top_k = experts_NTK.shape[-1]
  valid = valid_NT.astype(jnp.float32)
  tokens_N = jnp.maximum(valid.sum(-1), 1.0)
  chosen_NTE = jax.nn.one_hot(experts_NTK, experts).sum(-2) * valid[..., None]
  f_NE = experts / (top_k * tokens_N[:, None]) * chosen_NTE.sum(-2)
  probs_NTE = scores_NTE / jnp.sum(scores_NTE, -1, keepdims=True)
  p_NE = jnp.sum(probs_NTE * valid[..., None], -2) / tokens_N[:, None]
  return alpha * jnp.mean(jnp.sum(f_NE * p_NE, -1))


def rank_within(ids_S: jax.Array, num_ids: int, weights_S: jax.Array | None = None):
  """For each slot, how many earlier slots carry the same id (the slot's place in its queue)."""
  same_SI = jax.nn.one_hot(ids_S, num_ids, dtype=jnp.int32)
  if weights_S is not None:
    same_SI = same_SI * weights_S[:, None]
  return jnp.sum((jnp.cumsum(same_SI, axis=0) - 1) * same_SI, axis=-1)


# Expert FFNs -----------------------------------------------------------------------------------


def swiglu(x, wi_gate, wi_up, wo, matmul):
  """An expert's SwiGLU, W_o · (silu(W_gate x) ⊙ W_up x), through `matmul(x, w)`."""
  return matmul(jax.nn.silu(matmul(x, wi_gate)) * matmul(x, wi_up), wo)


@gin.configurable(allowlist=["implementation", "block_rows"])
def grouped_swiglu(x_ND: jax.Array, wi_gate_EDF, wi_up_EDF, wo_EFD, group_sizes_E: jax.Array,
                   *, implementation: str | None = None, block_rows: int = 32,
                   dot_general=jax.lax.dot_general) -> jax.Array:
  """Rows sorted by expert (the first group_sizes[0] rows go to expert 0, …) through their
  expert's SwiGLU: grouped matmuls.

  'ragged_dot' is `jax.lax.ragged_dot`, a grouped-matmul kernel on TPU and GPU; 'blocks'
  places each expert's rows in whole blocks of `block_rows` (zero-padded) and multiplies block
  by block with the block's expert's weights gathered: at most N + E · block_rows rows of work,
  where XLA:CPU's ragged_dot computes every expert for every row (E · N). None: 'blocks' on
  CPU, 'ragged_dot' elsewhere. `dot_general` is the 'mlp' role's matmul (FP8 quantises the
  experts too: its `ragged_dot` method, where it has one, replaces lax.ragged_dot).
  """
  if implementation not in GROUPED_MATMULS:
    raise UserError(f"grouped_swiglu.implementation={implementation!r}; valid: "
                    f"{GROUPED_MATMULS}")
  if implementation is None:
    implementation = "blocks" if target_platform() == "cpu" else "ragged_dot"
  weights = (wi_gate_EDF, wi_up_EDF, wo_EFD)
  if implementation == "ragged_dot":
    ragged_dot = getattr(dot_general, "ragged_dot", jax.lax.ragged_dot)
    return swiglu(x_ND, *weights, lambda x, w: ragged_dot(x, w, group_sizes_E))
  layout = BlockLayout.of(group_sizes_E, x_ND.shape[0], block_rows)
  expert_n = layout.block_group_n
  per_block = (((2,), (1,)), ((0,), (0,)))  # nbk, nkf -> nbf
  y_nbD = swiglu(layout.scatter(x_ND), *weights,
                 lambda x_nbK, w_EKF: dot_general(x_nbK, w_EKF[expert_n], per_block))
  return layout.gather(y_nbD)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BlockLayout:
  """Where each sorted row sits in a buffer of blocks, each block holding rows of one group."""
  position_N: jax.Array  # row → flat buffer position
  block_group_n: jax.Array  # block → its group
  num_blocks: int = dataclasses.field(metadata=dict(static=True))
  block_rows: int = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def of(cls, group_sizes_E, rows: int, block_rows: int) -> BlockLayout:
    experts = group_sizes_E.shape[0]
    blocks_E = (group_sizes_E + block_rows - 1) // block_rows
    first_block_E = jnp.cumsum(blocks_E) - blocks_E
    first_row_E = jnp.cumsum(group_sizes_E) - group_sizes_E
    group_N = jnp.repeat(jnp.arange(experts), group_sizes_E, total_repeat_length=rows)
    position_N = (first_block_E[group_N] * block_rows
                  + jnp.arange(rows) - first_row_E[group_N])
    num_blocks = -(-rows // block_rows) + experts  # Σ ceil(n_e / b) ≤ ceil(N / b) + E
    block_group_n = jnp.clip(
        jnp.searchsorted(jnp.cumsum(blocks_E), jnp.arange(num_blocks), side="right"),
        0, experts - 1)
    return cls(position_N, block_group_n, num_blocks, block_rows)

  def scatter(self, x_ND):
    flat = jnp.zeros((self.num_blocks * self.block_rows, x_ND.shape[-1]), x_ND.dtype)
    return flat.at[self.position_N].set(x_ND, unique_indices=True).reshape(
        self.num_blocks, self.block_rows, -1)

  def gather(self, y_nbF):
    return y_nbF.reshape(-1, y_nbF.shape[-1])[self.position_N]


# The layer -------------------------------------------------------------------------------------


class MoeMlp(nnx.Module):
  """Shared + routed SwiGLU experts; balancing state and load statistics as Variables."""

  def __init__(self, features: int, cfg: MoeConfig, *, init_std: float = 0.02,
               out_init_std: float | None = None, dtype=None, param_dtype=jnp.float32,
               rngs: nnx.Rngs):
    self.cfg = cfg
    e, f = cfg.num_experts, cfg.expert_dim

    def expert_kernel(shape, axes, std):
      return nnx.Param(nnx.with_partitioning(normal(std), axes)(rngs.params(), shape,
                                                                param_dtype))

    self.router = Dense(features, e, ("embed", None), role=None, use_bias=False,
                        init_std=init_std, dtype=jnp.float32, rngs=rngs)
    self.wi_gate = expert_kernel((e, features, f), ("expert", "embed", "mlp"), init_std)
    self.wi_up = expert_kernel((e, features, f), ("expert", "embed", "mlp"), init_std)
    self.wo = expert_kernel((e, f, features), ("expert", "mlp", "embed"),
                            out_init_std or init_std)
    if cfg.num_shared_experts:
      self.shared = GatedMlp(features, cfg.num_shared_experts * f, jax.nn.silu,
                             init_std=init_std, out_init_std=out_init_std, dtype=dtype,
                             param_dtype=param_dtype, rngs=rngs)
    self.expert_dot_general = dot_general_for("mlp")
    self.bias = RouterBias(jnp.zeros((e,), jnp.float32))
    self.bias_updates = BalanceUpdates(jnp.zeros((), jnp.int32))
    self.load_max = AuxMetric(jnp.zeros(()), reduce="each")  # max_i load_i / mean load
    self.load_min = AuxMetric(jnp.zeros(()), reduce="each")
    if cfg.capacity_factor is not None:
      self.dropped = AuxMetric(jnp.zeros(()), reduce="each")  # share of slots dropped
    if cfg.balance_loss != "none":
      self.balance = AuxLoss(jnp.zeros(()))

  def __call__(self, x_BLD: jax.Array, valid_BL: jax.Array | None = None, *,
               update_balance: bool = False, record: bool = True) -> jax.Array:
    """`valid_BL` marks real tokens (padding neither counts as load nor gets experts);
    `update_balance` applies the bias rule (training passes); `record` False writes no
    statistics (decoding, whose loop body may not write the model's Variables)."""
    cfg = self.cfg
    batch, length, features = x_BLD.shape
    valid_BL = jnp.ones((batch, length), bool) if valid_BL is None else valid_BL
    x_TD = x_BLD.reshape(-1, features)
    valid_T = valid_BL.reshape(-1)
    logits_TE = self.router(x_TD.astype(jnp.float32))
    scores_TE = (jax.nn.sigmoid(logits_TE) if cfg.router == "sigmoid"
                 else jax.nn.softmax(logits_TE, axis=-1))
    experts_TK, gates_TK = route(scores_TE, jax.lax.stop_gradient(self.bias[...]), cfg)
    gates_TK = jnp.where(valid_T[:, None], gates_TK, 0.0)
    counts_E = jnp.zeros(cfg.num_experts).at[experts_TK].add(
        jnp.broadcast_to(valid_T[:, None], experts_TK.shape).astype(jnp.float32))
    if cfg.capacity_factor is not None:
      gates_TK, kept = self._drop_over_capacity(experts_TK, gates_TK, valid_T)
      if record:
        self.dropped[...] = 1.0 - kept / jnp.maximum(counts_E.sum(), 1.0)
    if record:
      mean_load = jnp.maximum(counts_E.mean(), 1e-9)
      self.load_max[...] = counts_E.max() / mean_load
      self.load_min[...] = counts_E.min() / mean_load
    if cfg.balance_loss != "none" and record:
      groups = batch if cfg.balance_loss == "sequence" else 1
      self.balance[...] = balance_loss(
          scores_TE.reshape(groups, -1, cfg.num_experts),
          experts_TK.reshape(groups, -1, cfg.top_k), valid_T.reshape(groups, -1),
          cfg.balance_alpha)
    if update_balance and cfg.bias_update_rate:
      updates = self.bias_updates[...]
      rate = cfg.bias_update_rate * (1.0 if cfg.bias_update_steps is None
                                     else (updates < cfg.bias_update_steps))
      self.bias[...] = self.bias[...] + rate * jnp.sign(counts_E.mean() - counts_E)
      self.bias_updates[...] = updates + 1

    dispatch = {"dense": self._dense, "dropless": self._dropless,
                "expert_parallel": self._expert_parallel}[cfg.dispatch]
    routed_TD = dispatch(x_TD, experts_TK, gates_TK)
    y_TD = routed_TD.astype(x_BLD.dtype)
    if cfg.num_shared_experts:
      y_TD = y_TD + self.shared(x_TD[None])[0]
    return constrain(y_TD.reshape(batch, length, features), ("batch", "length", "act_embed"))

  def _weights(self, dtype):
    return tuple(w[...].astype(dtype) for w in (self.wi_gate, self.wi_up, self.wo))

  def _dense(self, x_TD, experts_TK, gates_TK):
    """Every expert on every token, weighted by the gates (zero where not chosen)."""
    x_ETD = jnp.broadcast_to(x_TD, (self.cfg.num_experts, *x_TD.shape))
    per_expert = (((2,), (1,)), ((0,), (0,)))  # etk, ekf -> etf
    y_ETD = swiglu(x_ETD, *self._weights(x_TD.dtype),
                   lambda x_ETK, w_EKF: self.expert_dot_general(x_ETK, w_EKF, per_expert))
    combine_TE = jnp.zeros((x_TD.shape[0], self.cfg.num_experts), jnp.float32).at[
        jnp.arange(x_TD.shape[0])[:, None], experts_TK].add(gates_TK)
    return jnp.einsum("te,etd->td", combine_TE.astype(y_ETD.dtype), y_ETD)

  def _dropless(self, x_TD, experts_TK, gates_TK):
    """Slots sorted by expert, grouped matmuls, then each slot back to its token."""
    tokens, top_k = experts_TK.shape
    expert_S = experts_TK.reshape(-1)
    order_S = jnp.argsort(expert_S, stable=True)
    token_S = order_S // top_k
    group_sizes_E = jnp.bincount(expert_S, length=self.cfg.num_experts)
    y_SD = grouped_swiglu(x_TD[token_S], *self._weights(x_TD.dtype), group_sizes_E,
                          dot_general=self.expert_dot_general)
    weighted_SD = y_SD * gates_TK.reshape(-1)[order_S][:, None].astype(y_SD.dtype)
    return jnp.zeros_like(x_TD).at[token_S].add(weighted_SD)

  def _expert_parallel(self, x_TD, experts_TK, gates_TK):
    """Each rank of `expert` holds E / ranks experts and T / ranks tokens (over every batch
    axis); slots travel to their expert's rank and back by all-to-all."""
    mesh = jax.sharding.get_abstract_mesh()
    tokens = active_spec(("batch", None))
    if mesh.empty or "expert" not in mesh.axis_names or tokens is None:
      raise UserError("MoeConfig.dispatch='expert_parallel' runs under a mesh with an "
                      "'expert' axis (the trainer's make_mesh.expert); use 'dropless' here")
    ranks = mesh.shape["expert"]
    if self.cfg.num_experts % ranks:
      raise UserError(f"MoeConfig.num_experts={self.cfg.num_experts} is not divisible by the "
                      f"mesh's expert axis ({ranks})")
    experts = PartitionSpec("expert", None, None)
    capacity = self.cfg.exchange_capacity
    run = functools.partial(_exchange_and_compute, ranks=ranks, capacity=capacity,
                            dot_general=self.expert_dot_general)
    return jax.shard_map(run, mesh=mesh,
                         in_specs=(tokens, tokens, tokens, experts, experts, experts),
                         out_specs=tokens, check_vma=False)(
                             x_TD, experts_TK, gates_TK, *self._weights(x_TD.dtype))

  def _drop_over_capacity(self, experts_TK, gates_TK, valid_T):
    """Gates of the slots past each expert's capacity set to 0, earlier tokens first."""
    cfg = self.cfg
    capacity = math.ceil(cfg.capacity_factor * experts_TK.size / cfg.num_experts)
    rank_S = rank_within(experts_TK.reshape(-1), cfg.num_experts,
                         jnp.repeat(valid_T, cfg.top_k).astype(jnp.int32))
    keep_TK = (rank_S < capacity).reshape(experts_TK.shape) & valid_T[:, None]
    return jnp.where(keep_TK, gates_TK, 0.0), keep_TK.sum().astype(jnp.float32)


def _exchange_and_compute(x_TD, experts_TK, gates_TK, wi_gate_EDF, wi_up_EDF, wo_EFD, *,
                          ranks: int, capacity: float | None, dot_general):
  """One rank's part of expert parallelism: its T tokens' slots go to rank expert // E_local
  (at most C per destination), its E_local experts run on what arrives, results return."""
  tokens, top_k = experts_TK.shape
  local_experts, features = wi_gate_EDF.shape[0], x_TD.shape[-1]
  slots = tokens * top_k
  per_rank = slots if capacity is None else max(1, math.ceil(capacity * slots / ranks))
  expert_S = experts_TK.reshape(-1)
  rank_S = expert_S // local_experts
  order_S = rank_within(rank_S, ranks)  # among the slots sent to the same rank
  keep_S = order_S < per_rank
  row_S = jnp.where(keep_S, rank_S * per_rank + order_S, ranks * per_rank)  # past end: dropped
  token_S = jnp.arange(slots) // top_k
  send_x = jnp.zeros((ranks * per_rank, features), x_TD.dtype).at[row_S].set(
      x_TD[token_S], mode="drop")
  send_e = jnp.full((ranks * per_rank,), local_experts, jnp.int32).at[row_S].set(
      expert_S % local_experts, mode="drop")  # local_experts marks an empty row
  exchange = lambda a: jax.lax.all_to_all(a.reshape(ranks, per_rank, *a.shape[1:]), "expert",
                                          0, 0).reshape(ranks * per_rank, *a.shape[1:])
  recv_x, recv_e = exchange(send_x), exchange(send_e)
  # Dropless over the local experts; empty rows go to a zero expert appended at the end.
  pad = lambda w: jnp.concatenate([w, jnp.zeros((1, *w.shape[1:]), w.dtype)])
  order = jnp.argsort(recv_e, stable=True)
  sizes = jnp.bincount(recv_e, length=local_experts + 1)
  y_sorted = grouped_swiglu(recv_x[order], pad(wi_gate_EDF), pad(wi_up_EDF), pad(wo_EFD),
                            sizes, dot_general=dot_general)
  y_rows = jnp.zeros_like(y_sorted).at[order].set(y_sorted, unique_indices=True)
  back = exchange(y_rows)
  y_SD = back.at[row_S].get(mode="fill", fill_value=0) * jnp.where(
      keep_S, gates_TK.reshape(-1), 0.0)[:, None].astype(back.dtype)
  return jnp.zeros_like(x_TD).at[token_S].add(y_SD)
