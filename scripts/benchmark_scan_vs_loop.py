"""Diagnostic: train-step time of scanned vs. looped layer stacks, with XLA's cost analysis.

Run with the tree to measure first on PYTHONPATH; this script uses that tree's own
`scripts/benchmark_train_step.py` (its `Bench`: real Setup, four in-memory batches, first step,
warm-up). In a tree whose model configs have `scan_layers` it measures both
`scan_layers=True` ("scan") and `False` ("loop") by default, or the --modes given ("unroll2",
"unrolled": scanned with `scan_unroll=2` or `True`; "loop_xla_attention": the loop with
`dot_product_attention.implementation='xla'`); in an older tree only its own loop ("old").
Rounds are interleaved across every (model, mode). With --hlo it also compiles each train step
once more to read `compiled.cost_analysis()` (flops, bytes accessed) and counts instructions of
the optimized HLO (while loops, fusions, copies, dynamic-(update-)slices), writing the HLO text
to --dump_dir if given.

  PYTHONPATH=. .venv/bin/python scripts/benchmark_scan_vs_loop.py --models mini,gpt_tiny,t5_tiny \\
      --hlo --dump_dir /tmp/hlo_new
  PYTHONPATH=/work/baseline .venv/bin/python scripts/benchmark_scan_vs_loop.py \\
      --models mini,gpt_tiny,t5_tiny --hlo --dump_dir /tmp/hlo_old
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import collections
import inspect
import json
import re
import statistics
import sys
import time

import pretrain_jax

TREE = os.path.dirname(os.path.dirname(os.path.abspath(pretrain_jax.__file__)))
sys.path.insert(0, os.path.join(TREE, "scripts"))
import benchmark_train_step as bts  # noqa: E402  (the measured tree's own copy)

import jax  # noqa: E402
from pretrain_jax.errors import UserError  # noqa: E402
from pretrain_jax.models import bert, gpt, t5  # noqa: E402

CONFIGS = {"bert": bert.BertConfig, "gpt": gpt.GptConfig, "t5": t5.T5Config}
HLO_OPS = ("while", "fusion", "copy", "dynamic-slice", "dynamic-update-slice", "dot",
           "custom-call", "transpose", "broadcast")


def hlo_op_counts(text: str) -> collections.Counter:
  """Instructions of an HLO module's text by opcode (`%x = f32[2]{0} add(...)`, tuple shapes
  `(f32[2], s32[])` included), over every computation (a while body counts once)."""
  ops = collections.Counter()
  for line in text.splitlines():
    _, eq, rhs = line.partition(" = ")
    if not eq or line.lstrip().startswith(("HloModule", "//")):
      continue
    rhs = rhs.lstrip()
    if rhs.startswith("("):  # a tuple shape: skip to its closing parenthesis
      depth = 0
      for i, ch in enumerate(rhs):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
          rhs = rhs[i + 1:]
          break
    else:
      rhs = rhs.split(" ", 1)[1] if " " in rhs else ""
    if m := re.match(r"\s*([a-z][\w-]*)\(", rhs):
      ops[m.group(1)] += 1
  return ops


def family(model: str) -> str:
  name = bts.model_name(model)
  return "bert" if name.startswith("bert_") else "t5" if name.startswith("t5") else "gpt"


def has_scan(model: str) -> bool:
  return "scan_layers" in inspect.signature(CONFIGS[family(model)]).parameters


MODES = {  # name: gin bindings, {cfg} = the family's config
    "scan": ["{cfg}.scan_layers = True"],
    "unroll2": ["{cfg}.scan_layers = True", "{cfg}.scan_unroll = 2"],
    "unrolled": ["{cfg}.scan_layers = True", "{cfg}.scan_unroll = True"],
    "loop": ["{cfg}.scan_layers = False"],
    "loop_xla_attention": ["{cfg}.scan_layers = False",
                           "dot_product_attention.implementation = 'xla'"],
    "old": [],
}


def make_bench(model: str, mode: str, args):
  original = bts.configure_model

  def configure_model(m, dtype, seq_len):
    original(m, dtype, seq_len)
    bts.configure([], [b.format(cfg=CONFIGS[family(m)].__name__) for b in MODES[mode]])

  bts.configure_model = configure_model
  try:
    b = bts.Bench(model, args.dtype, args.batch_size, args.seq_len, args.warmup)
  finally:
    bts.configure_model = original
  b.result["mode"] = mode
  b.result["cpu_step_s_repeats"] = []
  wall_run = b.run

  def run(steps):  # also the process's CPU time (all threads): less sensitive to others' load
    c0 = time.process_time()
    seconds = wall_run(steps)
    b.result["cpu_step_s_repeats"].append((time.process_time() - c0) / max(steps, 1))
    return seconds

  b.run = run
  if args.hlo:
    compiled = b.compiled()
    cost = compiled.cost_analysis()
    text = compiled.as_text()
    ops = hlo_op_counts(text)
    b.result["cost"] = {k: float(cost[k]) for k in ("flops", "bytes accessed", "transcendentals")
                        if k in cost}
    b.result["hlo_ops"] = {k: ops.get(k, 0) for k in HLO_OPS}
    b.result["hlo_instructions"] = sum(ops.values())
    if args.dump_dir:
      os.makedirs(args.dump_dir, exist_ok=True)
      with open(os.path.join(args.dump_dir, f"{bts.model_name(model)}_{mode}.hlo.txt"), "w") as f:
        f.write(text)
  return b


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="mini,gpt_tiny,t5_tiny")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--modes", default="scan,loop",
                 help=f"of {', '.join(m for m in MODES if m != 'old')} (in a tree without "
                      "scan_layers only 'old' runs); loop_xla_attention only where the model has "
                      "no attention dropout")
  p.add_argument("--hlo", action="store_true", help="cost analysis + optimized-HLO op counts")
  p.add_argument("--dump_dir", help="with --hlo: write each optimized HLO here")
  p.add_argument("--output")
  args = p.parse_args()
  print(f"# tree {TREE}", file=sys.stderr, flush=True)
  benches = []
  for model in args.models.split(","):
    for mode in (args.modes.split(",") if has_scan(model) else ("old",)):
      try:
        benches.append(make_bench(model, mode, args))
      except UserError as e:  # e.g. 'xla' attention with attention dropout
        print(f"# skip {model} {mode}: {e}", file=sys.stderr, flush=True)
        continue
      print(f"# set up {model} {mode}: first step {benches[-1].result['first_step_s']:.1f} s",
            file=sys.stderr, flush=True)
  for rep in range(args.repeats):
    for b in benches:
      b.result["step_s_repeats"].append(b.run(args.steps))
    print(f"# round {rep + 1}: " + ", ".join(
        f"{b.result['model']} {b.result['mode']} {b.result['step_s_repeats'][-1] * 1e3:.0f} ms "
        f"(CPU {b.result['cpu_step_s_repeats'][-1] * 1e3:.0f})" for b in benches),
        file=sys.stderr, flush=True)
  ratios = {}  # same-process, same-round ratios of step time: each mode / loop
  for b in benches:
    loop = next((c for c in benches if c.result["model"] == b.result["model"]
                 and c.result["mode"] == "loop"), None)
    if loop and b is not loop:
      for key, what in (("step_s_repeats", "step time"), ("cpu_step_s_repeats", "CPU time")):
        ratios[f"{b.result['model']} {b.result['mode']}/loop {what}"] = statistics.median(
            s / l for s, l in zip(b.result[key], loop.result[key]))
  results = [b.finish() for b in benches]
  for r in results:
    r["cpu_step_s"] = statistics.median(r["cpu_step_s_repeats"])
  print(f"\ntree {TREE}; jax {jax.__version__}; load average {os.getloadavg()[0]:.1f}\n")
  print("| model | mode | first step (s) | step (ms) | CPU ms/step | tokens/s | GFLOP (XLA) "
        "| GB accessed | HLO instructions | " + " | ".join(HLO_OPS) + " |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(HLO_OPS))
  for r in results:
    c, o = r.get("cost", {}), r.get("hlo_ops", {})
    print(f"| {r['model']} | {r['mode']} | {r['first_step_s']:.1f} | {r['step_s'] * 1e3:.0f} "
          f"| {r['cpu_step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} | {c.get('flops', 0) / 1e9:.2f} "
          f"| {c.get('bytes accessed', 0) / 1e9:.3f} | {r.get('hlo_instructions', '-')} | "
          + " | ".join(str(o.get(k, "-")) for k in HLO_OPS) + " |")
  print("".join(f"\n{name}, median of rounds: {value:.3f}" for name, value in ratios.items()))
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"results": results, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
  main()
