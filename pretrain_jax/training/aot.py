"""Compiling the train step for hardware that is not here.

libtpu compiles for a named TPU topology without a TPU (`jax.experimental.topologies`): the
real step, lowered against abstract state and batch on a mesh over the topology's devices,
fails at compile time if it does not fit, and XLA reports its memory per device and its FLOPs.
"""

from __future__ import annotations

import importlib.util

from jax.experimental import topologies

from pretrain_jax.errors import UserError

TOPOLOGY_EXAMPLES = "v3:4x4, v4:2x2x1, v5e:2x2, v5p:2x2x1, v6e:4x4"


def topology_devices(name: str) -> list:
  """The devices of TPU topology `name` (e.g. 'v5e:2x2'), for `make_mesh(devices=...)`."""
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(f"compiling for the TPU topology {name!r} needs libtpu: "
                    "pip install -e '.[tpu]'")
  try:
    return list(topologies.get_topology_desc(name, "tpu").devices)
  except Exception as e:  # libtpu's own message, first line: which part of the name is wrong
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"TPU topology {name!r} was not accepted ({first}); names look like "
                    f"{TOPOLOGY_EXAMPLES}") from None


def report(compiled) -> dict:
  """What XLA says of a compiled SPMD program, per device: bytes of arguments (parameters,
  optimizer state, batch), outputs, temporaries and code; peak = arguments + outputs +
  temporaries − donated aliases; FLOPs and bytes accessed by its cost model (which does not
  see inside Pallas/Mosaic kernels: `kernels` counts them)."""
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  out = {
      "argument_bytes": memory.argument_size_in_bytes,
      "output_bytes": memory.output_size_in_bytes,
      "alias_bytes": memory.alias_size_in_bytes,
      "temp_bytes": memory.temp_size_in_bytes,
      "code_bytes": memory.generated_code_size_in_bytes,
      "flops": float(cost.get("flops", 0.0)),
      "bytes_accessed": float(cost.get("bytes accessed", 0.0)),
      "kernels": compiled.as_text().count('custom_call_target="tpu_custom_call"'),
  }
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                       - out["alias_bytes"])
  return out

