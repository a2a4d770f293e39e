"""Benchmark: train-step tokens/s of two checkouts side by side (e.g. the previous commit vs this one).

Runs each tree's own `scripts/benchmark_train_step.py` in a fresh subprocess with
PYTHONPATH=TREE (so that tree's package is imported), alternating between the trees round by
round (round 1: old, new; round 2: new, old; ...) so that load from other processes on a shared
machine hits both alike. Every subprocess sets up every model (compile + warm-up) and then
times `--steps` steps `--repeats` times; per model and tree, the report gives the median
tokens/s over rounds and the new/old ratio (of the medians, and the median of the per-round
ratios, each round's old and new run being adjacent in time).

  .venv/bin/python scripts/benchmark_commits.py --old /work/baseline --new . --rounds 3 \\
      --models mini,gpt_tiny,t5_tiny --output /tmp/commits.json
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchmark_compile import machine_line, source_hash, succeeded  # noqa: E402  (same directory)

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_tree(tree: str, args, out: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_ENABLE_COMPILATION_CACHE="false", PYTHONPATH=tree)
  cmd = [sys.executable, os.path.join(tree, "scripts", "benchmark_train_step.py"),
         "--models", args.models, "--batch_size", str(args.batch_size),
         "--seq_len", str(args.seq_len), "--steps", str(args.steps),
         "--repeats", str(args.repeats), "--dtypes", args.dtype, "--output", out]
  for attempt in range(args.retries + 1):
    sources = source_hash(tree)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    if succeeded(proc, tree, cmd, last_try=attempt == args.retries):
      break
  with open(out) as f:
    data = json.load(f)
  data["wall_s"], data["sources"] = time.perf_counter() - t0, sources
  return data


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--old", required=True, help="the reference checkout")
  p.add_argument("--new", default=HERE)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--models", default="mini,gpt_tiny,t5_tiny")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--repeats", type=int, default=1, help="timed repeats inside each subprocess")
  p.add_argument("--dtype", default="float32")
  p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
  p.add_argument("--retries", type=int, default=2, help="after a failed run, wait 60 s and "
                                                       "retry this often")
  p.add_argument("--output", help="also write every run as JSON here")
  args = p.parse_args()
  trees = {"old": os.path.abspath(args.old), "new": os.path.abspath(args.new)}
  env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine": machine_line(), "argv": sys.argv[1:], "loadavg_start": os.getloadavg()}
  print(f"# {env['machine']}", file=sys.stderr, flush=True)
  t_start = time.perf_counter()
  runs = []  # (round, tree name, benchmark_train_step.py's JSON)
  with tempfile.TemporaryDirectory() as tmp:
    for rnd in range(args.rounds):
      for name in (("old", "new") if rnd % 2 == 0 else ("new", "old")):
        data = run_tree(trees[name], args, os.path.join(tmp, f"{name}{rnd}.json"))
        runs.append({"round": rnd, "tree": name, **data})
        print(f"# round {rnd + 1}/{args.rounds} {name}: " + ", ".join(
            f"{r['model']} {r['tokens_per_s']:.0f} tok/s (first step {r['first_step_s']:.1f} s)"
            for r in data["results"]) + f"; {data['wall_s']:.0f} s, load "
            f"{data['env']['loadavg_end'][0]:.1f}, sources {data['sources']}", file=sys.stderr, flush=True)
  env["loadavg_end"] = os.getloadavg()
  env["total_s"] = time.perf_counter() - t_start

  def value(rnd, tree, model, key):
    run = next(r for r in runs if r["round"] == rnd and r["tree"] == tree)
    return next(r[key] for r in run["results"] if r["model"] == model)

  models = [r["model"] for r in runs[0]["results"]]
  rounds = range(args.rounds)
  print(f"\n{env['machine']}; {env['date']}; jax {runs[0]['env']['jax']}; batch "
        f"{args.batch_size}, seq {args.seq_len}, {args.dtype}, {args.steps} steps x "
        f"{args.repeats} per run, {args.rounds} rounds; load average "
        f"{env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f}; "
        f"{env['total_s'] / 60:.1f} min\n")
  print("| model | old tokens/s | new tokens/s | new/old (medians) | new/old (median of rounds) "
        "| old first step (s) | new first step (s) |")
  print("|---|---:|---:|---:|---:|---:|---:|")
  summary = {}
  for model in models:
    old = [value(i, "old", model, "tokens_per_s") for i in rounds]
    new = [value(i, "new", model, "tokens_per_s") for i in rounds]
    first = {t: statistics.median(value(i, t, model, "first_step_s") for i in rounds)
             for t in trees}
    summary[model] = {"old": statistics.median(old), "new": statistics.median(new),
                      "ratio_of_medians": statistics.median(new) / statistics.median(old),
                      "median_ratio": statistics.median(n / o for n, o in zip(new, old)),
                      "first_step_s": first}
    s = summary[model]
    print(f"| {model} | {s['old']:,.0f} | {s['new']:,.0f} | {s['ratio_of_medians']:.3f} "
          f"| {s['median_ratio']:.3f} | {first['old']:.1f} | {first['new']:.1f} |")
  print("\nTokens/s of each round (old / new):\n")
  print("| model | " + " | ".join(f"round {i + 1}" for i in rounds) + " |")
  print("|---|" + "---:|" * args.rounds)
  for model in models:
    print(f"| {model} | " + " | ".join(
        f"{value(i, 'old', model, 'tokens_per_s'):,.0f} / "
        f"{value(i, 'new', model, 'tokens_per_s'):,.0f}" for i in rounds) + " |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"env": env, "summary": summary, "runs": runs}, f, indent=2)


if __name__ == "__main__":
  main()
