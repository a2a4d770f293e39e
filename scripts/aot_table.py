"""The BERT paper's runs (and T5, DeepSeek-style MoE) compiled for 64-chip TPU topologies.

Runs `pretrain-jax aot --json` once per (config, mesh, topology) row, each in its own process,
and prints the docs/aot.md table; --output also writes every result as JSON after each row,
keeping the rows of that file this run does not redo (a killed run loses only its current
row). Needs libtpu (`pip install -e '.[tpu]'`). Every row compiles each stage three times
(the scanned step for memory; 1- and 2-layer unrolled steps for the costs): minutes per row
on a laptop CPU.

  .venv/bin/python scripts/aot_table.py --output docs/aot_table.json
  .venv/bin/python scripts/aot_table.py --table docs/aot_table.json   # the table, no compiles
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_compile import machine_line  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOPOLOGIES = ("v3:8x8", "v4:4x4x4", "v5e:8x8", "v5p:4x4x4", "v6e:8x8")
ROWS = {  # name: (gin files and bindings, mesh, topologies)
    "bert_base": (["--gin_file=experiments/bert_base_paper.gin"], "data_parallel", TOPOLOGIES),
    "bert_large": (["--gin_file=experiments/bert_large_paper.gin"], "data_parallel",
                   TOPOLOGIES),
    "bert_large fsdp": (["--gin_file=experiments/bert_large_paper.gin"], "fsdp",
                        ("v3:8x8", "v5e:8x8")),
    "bert_large lamb 32k": (["--gin_file=experiments/bert_large_lamb.gin"], "fsdp",
                            ("v5p:4x4x4",)),
    # T5's own recipe (runs/t5_pretrain.gin: batch 128, inputs 512 / targets 114, 2^19 steps,
    # Adafactor) on the bundled corpus's task: the step's shapes are the C4 run's.
    "t5_1_1_base span corruption": (
        ["--gin_file=models/t5_1_1_base.gin", "--gin_file=objectives/t5_span_corruption.gin",
         "--gin_file=runs/t5_pretrain.gin", "--gin.T5Config.dtype='bfloat16'"],
        "data_parallel", ("v5e:8x8",)),
    "t5_1_1_large span corruption": (
        ["--gin_file=models/t5_1_1_large.gin", "--gin_file=objectives/t5_span_corruption.gin",
         "--gin_file=runs/t5_pretrain.gin", "--gin.T5Config.dtype='bfloat16'"],
        "fsdp", ("v5e:8x8",)),
    "deepseek_v2_lite (MoE)": (["--gin_file=experiments/deepseek_v2_lite_pod.gin"],
                               "fsdp_expert16", ("v5p:4x4x4",)),
}


def run_row(name: str, topology: str) -> dict:
  flags, mesh, _ = ROWS[name]
  cmd = [sys.executable, "-m", "pretrain_jax", "aot", *flags, f"--mesh={mesh}",
         f"--topology={topology}", "--json"]
  t0 = time.perf_counter()
  p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                     env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
  out = {"row": name, "mesh_file": mesh, "topology": topology, "command": " ".join(cmd[1:]),
         "machine": machine_line(), "wall_seconds": time.perf_counter() - t0}
  if p.returncode:
    errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
    out["error"] = errors[-1] if errors else p.stderr.strip().splitlines()[-1]
  else:
    out.update(json.loads(p.stdout.strip().splitlines()[-1]))
  return out


def table(results: list[dict]) -> str:
  gib = 2 ** 30
  lines = ["| run | mesh | topology (chips) | GiB per chip of HBM (fits) | TFLOP per step "
           "(XLA / 6N formula) | predicted step, ms (bound) | predicted recipe, days |",
           "|---|---|---|---:|---:|---:|---:|"]
  for r in results:
    head = f"| {r['row']} | {r['mesh_file']} | {r['topology']}"
    if "error" in r:
      error = r["error"].removeprefix("error: ")
      short = re.search(r"does not fit: it (needs .+? per device)", error)
      lines.append(f"{head} | " + (f"does not fit: {short[1]}" if short else error) + " ||||")
      continue
    mem = " / ".join(f"{s['bytes_per_chip'] / gib:.1f}" for s in r["stages"])
    flops = " / ".join(f"{s['flops_per_step'] / 1e12:,.0f}" + (
        f" ({s['flops_per_step'] / s['formula_flops_per_step']:.2f})"
        if s["formula_flops_per_step"] else "") for s in r["stages"])
    step = " / ".join(f"{s['step_seconds'] * 1e3:,.0f} ({s['bound']})" for s in r["stages"])
    lines.append(f"{head} ({r['chips']}) | {mem} of {r['hbm_per_chip'] / gib:.0f} "
                 f"({'yes' if r['fits'] else 'no'}) | {flops} | {step} | {r['recipe_days']:.2f} |")
  return "\n".join(lines)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rows", default=",".join(ROWS), help="comma list of row names")
  p.add_argument("--topologies", default="", help="comma list (default: each row's own)")
  p.add_argument("--output", help="write the results as JSON here")
  p.add_argument("--table", metavar="JSON", help="compile nothing: print the table of the rows "
                 "in this results file (an --output), in the order of ROWS")
  args = p.parse_args()
  if args.table:
    with open(args.table) as f:
      rows = json.load(f)["rows"]
    order = list(ROWS)
    rows.sort(key=lambda r: (order.index(r["row"]) if r["row"] in order else len(order)))
    print(table(rows))
    return
  results = []
  kept = []  # --output's earlier rows that this run does not redo
  if args.output and os.path.exists(args.output):
    with open(args.output) as f:
      kept = json.load(f)["rows"]
  for name in args.rows.split(","):
    for topology in (args.topologies.split(",") if args.topologies else ROWS[name][2]):
      results.append(run_row(name, topology))
      kept = [r for r in kept if (r["row"], r["topology"]) != (name, topology)]
      print(f"# {name} on {topology}: {results[-1].get('error') or 'ok'} "
            f"({results[-1]['wall_seconds']:.0f} s)", file=sys.stderr, flush=True)
      if args.output:
        with open(args.output, "w") as f:
          json.dump({"machine": machine_line(), "rows": kept + results}, f, indent=1)
  print(f"Compiled on {machine_line()}; per stage (length 128 / 512 where the run has two):\n")
  print(table(results))


if __name__ == "__main__":
  main()
