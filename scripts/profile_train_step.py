"""Profile: where a train step's time goes, by XLA operation, from a jax.profiler trace.

Builds a `benchmark_train_step.py` model (mini, tiny, gpt_tiny, hf_llama, ...; extra gin
--bindings on top), runs warm-up steps, traces `--steps` steps with `jax.profiler.trace`
(a Perfetto trace), and sums the host-thread events of the compiled step by name: XLA:CPU
runs each fusion, dot and copy as one event. Prints the top entries with their share of the
step, grouped also by kind (dot = matmul, fusion = elementwise/reduce, copy/transpose,
rng, ...). The trace stays in --trace_dir for Perfetto (ui.perfetto.dev) or TensorBoard.

  .venv/bin/python scripts/profile_train_step.py --model tiny --bindings "BertConfig.vocab_size = 8064"
  .venv/bin/python scripts/profile_train_step.py --model hf_llama --top 25
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import jax  # noqa: E402

import benchmark_train_step as bts  # noqa: E402  (same directory)
from benchmark_compile import machine_line  # noqa: E402


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """Op name -> (kind, jax primitive it came from, result shape) from the compiled HLO text.

  Kind is 'matmul' for dots and the YNNPACK fusions XLA:CPU builds around them, else the
  op's own kind (loop fusion, copy, ...); the primitive is the last part of the op's
  `op_name` metadata (dot_general, exp, select_n, threefry2x32, ...)."""
  ops = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+) (\w[\w\-]*)\((.*)$", hlo_text, re.M):
    name, shape, opcode, rest = m.groups()
    meta = re.search(r'op_name="([^"]*)"', rest)
    primitive = meta.group(1).split("/")[-1] if meta else "?"
    if "__ynn_fusion" in rest or opcode in ("dot", "convolution"):
      k = "matmul"
    elif opcode == "fusion":
      k = "fusion (" + (re.search(r"kind=(\w+)", rest) or [None, "?"])[1] + ")"
    else:
      k = opcode
    ops[name] = (k, primitive, shape)
  return ops


def events(trace_dir: str) -> list[dict]:
  paths = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not paths:
    raise SystemExit(f"no Perfetto trace under {trace_dir}")
  with gzip.open(max(paths, key=os.path.getmtime)) as f:
    trace = json.load(f)
  return [e for e in trace["traceEvents"] if e.get("ph") == "X" and "dur" in e]


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True)
  p.add_argument("--bindings", default="", help="gin bindings separated by ';'")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--top", type=int, default=20)
  p.add_argument("--trace_dir", default=None)
  args = p.parse_args()
  bindings = tuple(b.strip() for b in args.bindings.split(";") if b.strip())
  bench = bts.Bench(args.model, "float32", args.batch_size, args.seq_len, warmup=2,
                    bindings=bindings)
  step_s = bench.run(args.steps)
  ops = hlo_ops(bench.compiled().as_text())
  trace_dir = args.trace_dir or tempfile.mkdtemp(prefix="profile_")
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    bench.run(args.steps)
  evs = events(trace_dir)
  # The compiled step's ops: events nested in an XLA executable's run, named like HLO ops.
  hlo = [e for e in evs if e["name"] in ops]
  by_name, by_kind, by_primitive = (collections.Counter() for _ in range(3))
  for e in hlo:
    k, primitive, _ = ops[e["name"]]
    seconds = e["dur"] / 1e6 / args.steps
    by_name[e["name"]] += seconds
    by_kind[k] += seconds
    by_primitive[f"{k}: {primitive}"] += seconds
  total = sum(by_kind.values())
  print(f"\n{machine_line()}; {args.model} {bindings or ''}, batch {args.batch_size} x "
        f"{args.seq_len}, fp32; step {step_s * 1e3:.0f} ms untraced; {len(hlo)} op events, "
        f"{total * 1e3:.0f} ms of op time per step (both threads; trace in {trace_dir})\n")
  print("| kind | ms / step | share |\n|---|---:|---:|")
  for k, s in by_kind.most_common():
    print(f"| {k} | {s * 1e3:.1f} | {s / total:.1%} |")
  print("\n| kind: jax primitive | ms / step | share |\n|---|---:|---:|")
  for k, s in by_primitive.most_common(args.top):
    print(f"| {k} | {s * 1e3:.1f} | {s / total:.1%} |")
  print("\n| op | kind | primitive | shape | ms / step | share |\n|---|---|---|---|---:|---:|")
  for name, s in by_name.most_common(args.top):
    k, primitive, shape = ops[name]
    print(f"| {name} | {k} | {primitive} | {shape} | {s * 1e3:.1f} | {s / total:.1%} |")


if __name__ == "__main__":
  main()
