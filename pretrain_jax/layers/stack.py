"""A stack of identical layers: parameters stacked on a leading `layers` axis, run by scan.

    Stack(make_layer, n)       n layers built at once (nnx.vmap), every Variable [n, ...]
    stack(x, *args, xs=...)    x ← layer_i(x, *args, xs_i) for i = 0 … n − 1 (jax.lax.scan)

Compile time stays flat in depth: the layer is traced once. `remat_policy` names one of
`jax.checkpoint_policies` ('nothing_saveable' keeps only each layer's input for the backward
pass, 'dots_saveable' also its matmul outputs, ...), or 'none' for no rematerialisation.
`unroll` layers run per scan iteration (`jax.lax.scan(..., unroll=)`): 1 keeps the compiled
step's size flat in depth; True unrolls the whole stack into straight-line code, which runs
~10 % faster on CPU at tiny sizes (no while-loop boundary between layers, no stacked residual
buffers) at a compile cost that grows with depth. `scan=False` runs the same stacked parameters
in a Python loop (for debugging: prints and breakpoints inside a layer); checkpoints are the
same in all three.

Stacks whose layers differ (DeepSeek's dense first layers, then MoE layers) are stacks of
stacks: a model holds several `Stack`s and runs them in order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from pretrain_jax.errors import UserError

REMAT_POLICIES = ("none", "nothing_saveable", "dots_saveable", "dots_with_no_batch_dims_saveable",
                  "checkpoint_dots", "checkpoint_dots_with_no_batch_dims", "everything_saveable")


def check_stack_options(owner: str, remat_policy: str, unroll: int | bool) -> None:
  if remat_policy not in REMAT_POLICIES:
    raise UserError(f"{owner}.remat_policy={remat_policy!r}; valid: {REMAT_POLICIES}")
  if not (unroll is True or (type(unroll) is int and unroll >= 1)):
    raise UserError(f"{owner}.scan_unroll={unroll!r}; valid: an int >= 1 (layers per scan "
                    "iteration) or True (the whole stack unrolled)")


class Stack(nnx.Module):
  """`num_layers` layers from `make_layer(rngs)` as one `block` whose Variables are stacked on
  axis 0 (parameter paths read `.../layers/block/attention/query/kernel`).

  A layer is called as `layer(x, *args, xs_i, rngs=..., **kwargs) -> (x, y)`: `x` is carried
  from layer to layer, `xs_i` is this layer's slice of per-layer inputs (a KV cache; None when
  there are none), and the `y`s come back stacked (the updated caches).
  """

  def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
               rngs: nnx.Rngs, scan: bool = True, unroll: int | bool = 1,
               remat_policy: str = "none"):
    check_stack_options("Stack", remat_policy, unroll)

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def build(rngs):
      return make_layer(rngs)

    self.block = build(rngs)
    self.num_layers, self.scan, self.unroll = num_layers, scan, unroll
    self.remat_policy = remat_policy

  def __call__(self, x: Any, *args, xs: Any = None, rngs: nnx.Rngs | None = None,
               write_state: bool = True, **kwargs) -> tuple[Any, Any]:
    """(x after every layer, the layers' stacked second outputs). `write_state` False leaves
    the layers' non-gradient state as it was (decoding loops, which may not write it)."""
    graphdef, params, other = nnx.split(self.block, nnx.Param, ...)
    key = rngs.dropout() if rngs is not None else None

    def body(x, inputs):
      i, params_i, other_i, xs_i = inputs
      layer = nnx.merge(graphdef, params_i, other_i)
      layer_rngs = None if key is None else nnx.Rngs(dropout=jax.random.fold_in(key, i))
      x, y = layer(x, *args, xs_i, rngs=layer_rngs, **kwargs)
      return x, (nnx.state(layer, nnx.Not(nnx.Param)), y)

    if self.remat_policy != "none":  # CSE can undo remat only in straight-line code
      straight_line = not self.scan or self.unroll is True or self.unroll >= self.num_layers
      body = jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, self.remat_policy),
                            prevent_cse=straight_line)
    inputs = (jnp.arange(self.num_layers), params, other, xs)
    if self.scan:
      x, (other, ys) = jax.lax.scan(body, x, inputs, unroll=self.unroll)
    else:
      outputs = []
      for i in range(self.num_layers):
        x, out = body(x, jax.tree.map(lambda a, i=i: a[i], inputs))
        outputs.append(out)
      other, ys = jax.tree.map(lambda *a: jnp.stack(a), *outputs)
    if write_state:  # non-gradient state the layers wrote (counters, AuxLoss)
      nnx.update(self.block, other)
    return x, ys

  def layer(self, i: int) -> nnx.Module:
    """Layer i as a module of its own (its slice of every stacked Variable): for tests and
    for converting checkpoints."""
    graphdef, state = nnx.split(self.block)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
