"""The `aot` verb: the real train step compiled for a TPU topology that is not here.

libtpu compiles for a named topology without a TPU (`jax.experimental.topologies`): the step
`train` would run (same Setup, same shardings, batch shapes from the task's abstract spec) is
lowered against abstract state on a mesh over the topology's devices. A step that does not fit
HBM fails here, at compile time. What XLA reports of the compiled program, plus the chip's
published peaks, gives a roofline step time:

    step = max(FLOPs / peak FLOP/s, HBM bytes / HBM bandwidth) + collective bytes / ICI bandwidth

per device, every term from XLA's own count of the compiled SPMD program. XLA's cost model
counts a loop body once, so the scanned layer stack (what trains, and what memory is read
from) is costed by compiling the step twice more with the stack unrolled at one and two
layers and extrapolating linearly in depth; a step split into microbatches is costed on one
microbatch, times their number. Collectives are costed as ring algorithms (an all-reduce
moves 2 (n − 1)/n of its bytes per device) over the chip's ICI all-reduce bandwidth, not
overlapped with compute.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
import time

import gin
import jax
from jax.experimental import topologies

from pretrain_jax import config
from pretrain_jax.data import pipeline
from pretrain_jax.errors import UserError
from pretrain_jax.training import partitioning, trainer

TOPOLOGY_EXAMPLES = "v3:8x8, v4:4x4x4, v5e:8x8, v5p:4x4x4, v6e:8x8"
GIB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """Published per-chip figures (Google Cloud TPU docs; v2 from Jouppi et al., CACM 2020).

  `ici_bandwidth` is what one chip's collectives can move per second: the pod's all-reduce
  bandwidth over its chips where published (v3, v4, v5e, v6e), which equals half the chip's
  bidirectional ICI bandwidth (the rule used for v5p), and the links' one-way sum for v2.
  A JAX device is a TensorCore on v2/v3 (two per chip) and a chip elsewhere (v4 and v5p
  run their two cores as one megacore device): each takes its share of the chip's figures.
  """
  name: str
  peak_flops: float  # dense bf16 FLOP/s
  hbm_bytes: float
  hbm_bandwidth: float  # bytes/s
  ici_bandwidth: float  # bytes/s


CHIPS = {  # by jax device_kind
    "TPU v2": Chip("v2", 45e12, 16 * GIB, 700e9, 4 * 496e9 / 8),
    "TPU v3": Chip("v3", 123e12, 32 * GIB, 900e9, 340e12 / 1024),
    "TPU v4": Chip("v4", 275e12, 32 * GIB, 1200e9, 1.1e15 / 4096),
    "TPU v5 lite": Chip("v5e", 197e12, 16e9, 819e9, 51.2e12 / 256),
    "TPU v5": Chip("v5p", 459e12, 95 * GIB, 2765e9, 1200e9 / 2),
    "TPU v6 lite": Chip("v6e", 918e12, 32e9, 1638e9, 102.4e12 / 256),
}


def topology_devices(name: str) -> list:
  """The devices of TPU topology `name` (e.g. 'v5e:8x8'), for `make_mesh(devices=...)`."""
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(f"compiling for the TPU topology {name!r} needs libtpu: "
                    "pip install -e '.[tpu]'")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no TPU to lock
  try:
    megacore = {"chip_config_name": "megacore"} if name.startswith("v4") else {}
    return list(topologies.get_topology_desc(name, "tpu", **megacore).devices)
  except Exception as e:  # libtpu's own message, first line: which part of the name is wrong
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise UserError(f"TPU topology {name!r} was not accepted ({first}); names look like "
                    f"{TOPOLOGY_EXAMPLES}") from None


def chip_of(device) -> Chip:
  if device.device_kind not in CHIPS:
    raise UserError(f"no published figures for {device.device_kind!r}; known: {sorted(CHIPS)}")
  return CHIPS[device.device_kind]


# ---------------------------------------------------------------------------------------------
# What XLA says of one compiled program, per device.

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1,
             "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+[0-9a-z]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?(\S+) = (.+?) ([a-z-]+)\((.*)$")
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
               "collective-permute")


def _shape_bytes(shape_text: str) -> int:
  return sum(_ITEMSIZE.get(dtype, 0) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(shape_text))


def _group_size(attributes: str, num_devices: int) -> int:
  """Devices in one replica group, from any of XLA's three spellings."""
  if m := re.search(r"replica_groups=mesh\[([^\]]*)\] \{([^}]*)\}", attributes):
    sizes = dict((k.strip("'"), int(v)) for k, v in re.findall(r"('[^']+')=(\d+)", m[1]))
    return math.prod(sizes[a.strip().strip("'")] for a in m[2].split(",") if a.strip())
  if m := re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes):
    return int(m[2])
  if m := re.search(r"replica_groups=\{\{([^}]*)\}", attributes):
    return len(m[1].split(","))
  return num_devices  # replica_groups={}: every device


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, float]:
  """Bytes each device sends per collective kind, as ring algorithms move them: all-reduce
  2 (n − 1)/n of its size, all-gather and all-to-all (n − 1)/n of theirs, reduce-scatter
  (n − 1) times its output, collective-permute its size. Async pairs are read at `-done`
  (its shape is the result) with the groups of their `-start`."""
  started, out = {}, dict.fromkeys(COLLECTIVES, 0.0)
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m:
      continue
    name, shape, op, rest = m.groups()
    if op.endswith("-start") and op[:-len("-start")] in COLLECTIVES:
      started[name] = (op[:-len("-start")], _group_size(rest, num_devices))
      continue
    if op.endswith("-done") and op[:-len("-done")] in COLLECTIVES:
      operand = re.match(r"\s*%?([^,)\s]+)", rest)
      kind, n = started.get(operand[1] if operand else "", (op[:-len("-done")], num_devices))
    elif op in COLLECTIVES:
      kind, n = op, _group_size(rest, num_devices)
    else:
      continue
    size = _shape_bytes(shape)
    out[kind] += {"all-reduce": 2 * (n - 1) / n * size, "all-gather": (n - 1) / n * size,
                  "all-to-all": (n - 1) / n * size, "reduce-scatter": (n - 1) * size,
                  "collective-permute": size}[kind]
  return out


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


# ---------------------------------------------------------------------------------------------
# The run gin describes, compiled stage by stage.

def _train_arg(name: str):
  """train.NAME as gin binds it, else trainer.train's own default."""
  default = inspect.signature(trainer.train).parameters[name].default
  return config.bound(f"train.{name}", None if default is gin.REQUIRED else default)


def _layer_kinds(cfg) -> tuple[dict[str, int], callable]:
  """The model's depth as counts of layer kinds, and the gin bindings that build a model with
  other counts: DeepSeek has dense and MoE layers; every other family one kind."""
  cls = type(cfg).__name__
  if getattr(cfg, "num_dense_layers", None) is not None:
    kinds = {"dense": cfg.num_dense_layers, "moe": cfg.num_layers - cfg.num_dense_layers}
    return kinds, lambda k: {f"{cls}.num_layers": k["dense"] + k["moe"],
                             f"{cls}.num_dense_layers": k["dense"]}
  return {"layers": cfg.num_layers}, lambda k: {f"{cls}.num_layers": k["layers"]}


@dataclasses.dataclass
class _Run:
  task: str
  model: object
  loss_fn: object
  feature_converter: object
  batch_size: int
  num_microbatches: int
  seed: int
  stages: list[tuple[int, int]]

  @classmethod
  def from_gin(cls) -> "_Run":
    if config.bound("train.model") is None:
      raise UserError("aot: no train.model in the gin config; pass a --gin_file such as "
                      "experiments/bert_base_paper.gin")
    return cls(task=_train_arg("task"), model=_train_arg("model"),
               loss_fn=_train_arg("loss_fn"), feature_converter=_train_arg("feature_converter"),
               batch_size=_train_arg("batch_size"),
               num_microbatches=_train_arg("num_microbatches"), seed=_train_arg("seed"),
               stages=trainer._stages(_train_arg("sequence_length"), _train_arg("num_steps"),  # pylint: disable=protected-access
                                      _train_arg("stages")))


@contextlib.contextmanager
def _with_bindings(bindings: dict, cfg=None):
  """Binds gin parameters for one compile, then binds back what `cfg` (the run's model config)
  holds: gin cannot unbind, and a binding left behind would change every later compile."""
  with gin.unlock_config():
    for name, value in bindings.items():
      gin.bind_parameter(name, value)
  try:
    yield
  finally:
    if cfg is not None:
      with gin.unlock_config():
        for name in bindings:
          gin.bind_parameter(name, getattr(cfg, name.split(".", 1)[1]))


def _compile(run: _Run, mesh, length: int, batch_size: int, num_microbatches: int,
             bindings: dict, cfg=None) -> tuple[trainer.Setup, object, float]:
  with _with_bindings(bindings, cfg):
    setup = trainer.Setup(run.model, run.loss_fn, sum(n for n, _ in run.stages),
                          num_microbatches, run.seed, mesh=mesh)
    batch = pipeline.batch_spec(run.task, pipeline.feature_lengths(length),
                                run.feature_converter, batch_size,
                                sharding_of=lambda n: partitioning.batch_sharding(mesh, n))
    t0 = time.perf_counter()
    compiled = setup.compile_step(batch)
  return setup, compiled, time.perf_counter() - t0


def _sharded_bytes(tree) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


def _costs(run: _Run, mesh, length: int, cfg, num_devices: int) -> dict[str, float]:
  """FLOPs, HBM bytes and collective bytes per device of one whole step: the stack unrolled
  at one and two layers of each kind, extrapolated linearly to the model's depth, on one
  microbatch, times the number of microbatches."""
  kinds, bindings_for = _layer_kinds(cfg)
  present = {k: n for k, n in kinds.items() if n > 0}
  base = {k: (1 if k in present else 0) for k in kinds}
  points = [base] + [{**base, k: 2} for k in present]
  cls = type(cfg).__name__
  measured, seconds = [], 0.0
  for point in points:
    _, compiled, s = _compile(run, mesh, length, run.batch_size // run.num_microbatches, 1,
                              {**bindings_for(point), f"{cls}.scan_unroll": True}, cfg)
    seconds += s
    r = report(compiled)
    measured.append({"flops": r["flops"], "hbm_bytes": r["bytes_accessed"],
                     **collective_bytes(compiled.as_text(), num_devices)})
  out = {}
  for key in measured[0]:
    slopes = {k: m[key] - measured[0][key] for k, m in zip(present, measured[1:])}
    out[key] = run.num_microbatches * (
        measured[0][key] + sum(slopes[k] * (present[k] - 1) for k in present))
  out["compile_seconds"] = seconds
  return out


def _oversized(error: Exception, setup_bytes: int, per_device: float, what: str) -> UserError:
  """One line for a step that does not fit: libtpu's own numbers, and what dominates."""
  text = str(error)
  size = r"([\d.]+[KMGT]?)"
  used = re.search(rf"Used {size} of {size} hbm", text)
  required = re.search(rf"required for (.+?) \({size}\) exceeds available HBM \({size}\)", text)
  args = re.search(rf"arguments {size}", text)
  program = re.search(rf"program {size}", text)
  numbers = (f"needs {used[1]} of {used[2]} HBM per device" if used else
             f"needs {required[2]} for {required[1]} of {required[3]} HBM per device"
             if required else (text.strip().splitlines() or ["RESOURCE_EXHAUSTED"])[0][:200])
  if setup_bytes > per_device:
    dominant = (f"parameters and optimizer state alone take {setup_bytes / GIB:.1f} GiB per "
                f"device of {per_device / GIB:.1f}: shard them (--mesh=fsdp)")
  else:
    dominant = ("temporaries dominate" + (f" ({program[1]} program, {args[1]} arguments)"
                                          if program and args else "") +
                ": lower train.batch_size per device, raise train.num_microbatches, or set "
                "the model's remat_policy")
  return UserError(f"{what} does not fit: it {numbers}; {dominant}")


def compile_run(topology: str) -> dict:
  """Compiles every stage of the gin-configured run for `topology` (see the module doc)."""
  devices = topology_devices(topology)
  chip = chip_of(devices[0])
  try:
    mesh = partitioning.make_mesh(devices=devices)
  except UserError:
    raise
  except Exception as e:  # jax.make_mesh: the shape does not map onto the physical torus
    defaults = inspect.signature(partitioning.make_mesh).parameters
    sizes = {a: config.bound(f"make_mesh.{a}", defaults[a].default)
             for a in partitioning.MESH_AXES}
    raise UserError(f"mesh {sizes} cannot be laid out on {topology} ({len(devices)} devices): "
                    f"{(str(e).strip().splitlines() or [type(e).__name__])[0][:200]}") from None
  run = _Run.from_gin()
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
  if run.batch_size % (batch_shards * run.num_microbatches):
    raise UserError(f"train.batch_size={run.batch_size} does not split into "
                    f"{run.num_microbatches} microbatches over data x fsdp x expert = "
                    f"{batch_shards} devices of mesh {dict(mesh.shape)}")
  num_chips = len({tuple(d.coords) for d in devices})  # a chip's cores share coordinates
  c = len(devices) // num_chips  # devices per chip
  per_device = lambda b: b / c  # noqa: E731  a chip's figures, one device's share
  stages = []
  for steps, length in run.stages:
    what = f"the step at sequence length {length} on {topology} (mesh {dict(mesh.shape)})"
    setup = None
    try:
      setup, compiled, seconds = _compile(run, mesh, length, run.batch_size,
                                          run.num_microbatches, {})
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      if "RESOURCE_EXHAUSTED" not in str(e) and "hbm" not in str(e).lower():
        raise
      setup = setup or trainer.Setup(run.model, run.loss_fn, 1, run.num_microbatches,
                                     run.seed, mesh=mesh)
      state = setup.abstract_with_shardings()
      raise _oversized(e, _sharded_bytes((state.params, state.opt_state)),
                       per_device(chip.hbm_bytes), what) from None
    memory = report(compiled)
    state = setup.abstract_with_shardings()
    costs = _costs(run, mesh, length, setup.model_config, len(devices))
    collective = sum(costs[k] for k in COLLECTIVES)
    t_flops = costs["flops"] / per_device(chip.peak_flops)
    t_hbm = costs["hbm_bytes"] / per_device(chip.hbm_bandwidth)
    t_ici = collective / per_device(chip.ici_bandwidth)
    step_seconds = max(t_flops, t_hbm) + t_ici
    stages.append({
        "sequence_length": length, "steps": steps, "fits": True,
        "bytes_per_chip": memory["peak_bytes"] * c,
        "params_bytes_per_chip": _sharded_bytes(state.params) * c,
        "optimizer_bytes_per_chip": _sharded_bytes(state.opt_state) * c,
        "temp_bytes_per_chip": memory["temp_bytes"] * c,
        "flops_per_step": costs["flops"] * len(devices),
        "formula_flops_per_step": (setup.flops_per_token(length, pipeline.decoder_length(length))
                                   * run.batch_size * (length + (pipeline.decoder_length(length) or 0))
                                   if setup.flops_per_token else None),
        "hbm_bytes_per_chip": costs["hbm_bytes"] * c,
        "collective_bytes_per_chip": {k: costs[k] * c for k in COLLECTIVES if costs[k]},
        "compute_seconds": t_flops, "hbm_seconds": t_hbm, "collective_seconds": t_ici,
        "step_seconds": step_seconds,
        "bound": max((t_flops, "compute"), (t_hbm, "HBM"), (t_ici, "ICI"))[1],
        "compile_seconds": seconds, "cost_compile_seconds": costs["compile_seconds"]})
  recipe = sum(s["steps"] * s["step_seconds"] for s in stages)
  total_steps = sum(s["steps"] for s in stages)
  return {
      "topology": topology, "device_kind": devices[0].device_kind, "chips": num_chips,
      "devices": len(devices), "mesh": dict(mesh.shape), "batch_size": run.batch_size,
      "num_microbatches": run.num_microbatches,
      "chip": dataclasses.asdict(chip),
      "fits": all(s["fits"] for s in stages),
      "bytes_per_chip": max(s["bytes_per_chip"] for s in stages),
      "hbm_per_chip": chip.hbm_bytes,
      "step_seconds": recipe / total_steps, "recipe_seconds": recipe,
      "recipe_days": recipe / 86400, "stages": stages,
  }


def table(result: dict) -> str:
  """The result for people: one line per stage, then the recipe."""
  r = result
  lines = [f"{r['topology']}: {r['chips']} chips ({r['devices']} x {r['device_kind']}), mesh "
           f"{r['mesh']}, batch {r['batch_size']}"
           + (f" in {r['num_microbatches']} microbatches" if r["num_microbatches"] > 1 else "")]
  for s in r["stages"]:
    lines.append(
        f"  length {s['sequence_length']:>5}, {s['steps']:,} steps: "
        f"{s['bytes_per_chip'] / GIB:.2f} of {r['hbm_per_chip'] / GIB:.1f} GiB per chip "
        f"(params {s['params_bytes_per_chip'] / GIB:.2f}, optimizer "
        f"{s['optimizer_bytes_per_chip'] / GIB:.2f}, temporaries "
        f"{s['temp_bytes_per_chip'] / GIB:.2f}); {s['flops_per_step'] / 1e12:,.1f} TFLOP per "
        f"step; predicted {s['step_seconds'] * 1e3:,.1f} ms per step ({s['bound']}-bound: "
        f"compute {s['compute_seconds'] * 1e3:,.1f}, HBM {s['hbm_seconds'] * 1e3:,.1f}, "
        f"ICI {s['collective_seconds'] * 1e3:,.1f} ms)")
  lines.append(f"  fits: {'yes' if r['fits'] else 'no'}; predicted recipe time "
               f"{r['recipe_days']:.2f} days ({r['recipe_seconds'] / 3600:,.1f} h)")
  return "\n".join(lines)


def main(topology: str | None, as_json: bool = False) -> None:
  if not topology:
    raise UserError(f"aot needs --topology (e.g. {TOPOLOGY_EXAMPLES})")
  result = compile_run(topology)
  print(json.dumps(result) if as_json else table(result))
