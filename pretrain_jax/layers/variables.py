"""The kinds of state a model may hold besides `nnx.Param`, and what the trainer does with each.

    nnx.Param    trained by the optimizer (unless a freeze filter marks it frozen)
    AuxLoss      a scalar the forward pass writes; the trainer adds it to the loss and logs it
    AuxMetric    a scalar the forward pass writes; the trainer logs it (not optimised)
    any other    non-gradient model state (router biases, FP8 scale history, step counters):
    nnx.Variable carried through the train step, which may update it; sharded by its logical
                 axes and checkpointed with the parameters

AuxLoss and AuxMetric are declared when the model is built (so the state's structure is fixed
and scanned stacks can carry them as a per-layer [layers] array) and written during
`__call__`; the trainer reads them after the forward pass and sums each over its layers.
"""

from flax import nnx


class AuxLoss(nnx.Variable):
  """An auxiliary loss term (MoE balance, MTP): added to the optimised loss, logged by path."""


class AuxMetric(nnx.Variable):
  """A quantity worth watching (expert load, router entropy): logged by path, not optimised;
  summed over a scanned stack's layers, or with `reduce='each'` logged layer by layer."""
