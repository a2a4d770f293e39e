"""Benchmark: whole-process wall time of a 2-step BERT-mini training run vs. depth, scanned vs. loop.

Each run is a fresh `python -m pretrain_jax train` subprocess (imports, gin, tracing, XLA
compilation, init, 2 train steps, one checkpoint at the last step) of
`models/bert_mini.gin` + `objectives/bert.gin` + `runs/pretrain.gin` with
`BertConfig.num_layers` = each of --layers, batch 8, sequence length 64 (so the steps
themselves cost next to nothing), eval off (`train.eval_every=0`), a fresh temporary model_dir,
`--no_progress`. Modes:

  scan   this tree, `BertConfig.scan_layers=True`, `scan_unroll=1` (jax.lax.scan, one layer per iteration)
  loop   this tree, `BertConfig.scan_layers=False` (same stacked parameters, Python loop)
  old    --baseline TREE (another checkout, e.g. the previous commit), its own loop

The persistent JAX compilation cache is off in every subprocess (JAX_COMPILATION_CACHE_DIR
unset, JAX_ENABLE_COMPILATION_CACHE=false), so every run compiles. JAX_LOG_COMPILES=1 makes
JAX log how long it traced, lowered and XLA-compiled each jitted function; the script parses
that to report compile-only time of the train step (trace + lower + compile) and of all jitted
functions, from the same runs. Runs are interleaved (for repeat: for layers: for mode) so that
load from other processes hits every configuration alike; medians over repeats are reported.

  .venv/bin/python scripts/benchmark_compile.py --layers 2,6,12,24 --repeats 3 \\
      --baseline /work/baseline --output /tmp/compile.json
"""

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOG_RE = re.compile(r"Finished (tracing (?P<t>\S+) for jit|jaxpr to MLIR module conversion "
                    r"jit\((?P<l>[^)]+)\)|XLA compilation of jit\((?P<c>[^)]+)\)) in "
                    r"(?P<s>[0-9.eE+-]+) sec")
STEP_FN = "_train_step"


def machine_line() -> str:
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    name, family = fields.get("Model name", "?").strip(), fields.get("CPU family", "?").strip()
    model = fields.get("Model", "?").strip()
    avx512 = "avx512f" in fields.get("Flags", "").split()
  except (OSError, subprocess.CalledProcessError, ValueError):
    name, family, model, avx512 = platform.processor() or "?", "?", "?", False
  # AMD family 25 (19h) is Zen 3 and Zen 4; of the two only Zen 4 has AVX-512. 26 is Zen 5.
  zen = {"25": " (Zen 4, AVX-512)" if avx512 else " (Zen 3, AVX2)",
         "26": " (Zen 5, AVX-512)"}.get(family, "") if name.startswith("AMD") else ""
  return f"lscpu Model name: {name}, CPU family {family} model {model}{zen}, {os.cpu_count()} CPUs"


def source_hash(tree: str) -> str:
  """A short hash of the tree's package sources (other people may edit it during a run)."""
  h = hashlib.sha1()
  for root, dirs, files in sorted(os.walk(os.path.join(tree, "pretrain_jax"))):
    dirs.sort()
    for name in sorted(files):
      if name.endswith((".py", ".gin")):
        with open(os.path.join(root, name), "rb") as f:
          h.update(name.encode() + f.read())
  return h.hexdigest()[:10]


def succeeded(proc: subprocess.CompletedProcess, label: str, cmd: list[str],
              last_try: bool) -> bool:
  """True if `proc` exited 0; else exits on the last try, or waits 60 s for a retry (the
  measured tree may be mid-edit by someone else)."""
  if proc.returncode == 0:
    return True
  message = (f"{label} failed (rc {proc.returncode}):\n{' '.join(cmd)}\n"
             f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  if last_try:
    sys.exit(message)
  print(f"# {message}\n# retrying in 60 s", file=sys.stderr, flush=True)
  time.sleep(60)
  return False


def command(tree: str, layers: int, mode: str, model_dir: str, args) -> list[str]:
  cmd = [sys.executable, "-m", "pretrain_jax", "train",
         "--gin_file=models/bert_mini.gin", "--gin_file=objectives/bert.gin",
         "--gin_file=runs/pretrain.gin",
         "--gin.BertConfig.vocab_size=8064",  # the bundled WordPiece vocabulary, padded to 64s
         f"--gin.BertConfig.num_layers={layers}",
         f"--gin.train.batch_size={args.batch_size}",
         f"--gin.train.sequence_length={args.seq_len}",
         f"--gin.train.num_steps={args.steps}", "--gin.train.eval_every=0",
         "--gin.train.checkpoint_every=1000", f"--model_dir={model_dir}", "--no_progress"]
  if mode in ("scan", "loop"):  # scan: one layer per iteration, whatever bert_mini.gin unrolls
    cmd.append(f"--gin.BertConfig.scan_layers={mode == 'scan'}")
    cmd.append("--gin.BertConfig.scan_unroll=1")
  return cmd


def run_one(tree: str, layers: int, mode: str, args) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update(JAX_ENABLE_COMPILATION_CACHE="false", JAX_LOG_COMPILES="1",
             PYTHONPATH=tree + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""),
             TF_CPP_MIN_LOG_LEVEL="3")
  for attempt in range(args.retries + 1):
    sources = source_hash(tree)
    model_dir = tempfile.mkdtemp(prefix=f"bench_compile_{mode}{layers}_")
    cmd = command(tree, layers, mode, model_dir, args)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True,
                          timeout=args.timeout)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(model_dir, ignore_errors=True)
    if succeeded(proc, f"{mode} L={layers}", cmd, last_try=attempt == args.retries):
      break
  phases = {"trace": {}, "lower": {}, "compile": {}}
  for m in LOG_RE.finditer(proc.stderr + proc.stdout):
    phase, name = next((p, m.group(g)) for p, g in (("trace", "t"), ("lower", "l"),
                                                      ("compile", "c")) if m.group(g))
    phases[phase][name] = phases[phase].get(name, 0.0) + float(m.group("s"))
  step = {p: phases[p].get(STEP_FN) for p in phases}
  return {"mode": mode, "layers": layers, "tree": tree, "sources": sources, "wall_s": wall,
          "cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
          "step_trace_s": step["trace"], "step_lower_s": step["lower"],
          "step_compile_s": step["compile"],
          "step_jit_s": (sum(step.values()) if all(v is not None for v in step.values())
                         else None),
          "all_jit_s": sum(sum(d.values()) for d in phases.values()),
          "phases": phases, "loadavg": os.getloadavg()[0]}


def med(rows, key):
  vals = [r[key] for r in rows if r.get(key) is not None]
  return statistics.median(vals) if vals else None


def fmt(x, spec=".1f"):
  return "-" if x is None else format(x, spec)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--layers", default="2,6,12,24")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--modes", default="scan,loop", help="of scan, loop")
  p.add_argument("--baseline", help="another checkout (e.g. the previous commit): adds 'old', "
                                    "its own layer loop, run with PYTHONPATH=BASELINE")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--timeout", type=float, default=1800, help="seconds per subprocess")
  p.add_argument("--retries", type=int, default=2, help="after a failed run, wait 60 s and "
                                                       "retry this often")
  p.add_argument("--output", help="also write every run as JSON here")
  args = p.parse_args()
  layer_counts = [int(x) for x in args.layers.split(",")]
  modes = args.modes.split(",") + (["old"] if args.baseline else [])
  trees = {"scan": HERE, "loop": HERE, "old": os.path.abspath(args.baseline or HERE)}
  env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
         "machine": machine_line(), "argv": sys.argv[1:], "loadavg_start": os.getloadavg()}
  print(f"# {env['machine']}", file=sys.stderr, flush=True)
  t_start = time.perf_counter()
  runs = []
  for rep in range(args.repeats):
    for layers in layer_counts:
      for mode in modes:
        r = run_one(trees[mode], layers, mode, args)
        r["repeat"] = rep
        runs.append(r)
        print(f"# repeat {rep + 1}/{args.repeats} L={layers:>2} {mode:>4}: wall {r['wall_s']:6.1f} s"
              f"  cpu {r['cpu_s']:6.1f} s  train-step trace+lower+compile "
              f"{fmt(r['step_jit_s'])} s  all jit {r['all_jit_s']:.1f} s  load "
              f"{r['loadavg']:.1f}  sources {r['sources']}", file=sys.stderr, flush=True)
  env["loadavg_end"] = os.getloadavg()
  env["total_s"] = time.perf_counter() - t_start

  def rows(mode, layers):
    return [r for r in runs if r["mode"] == mode and r["layers"] == layers]

  names = {"scan": "scanned", "loop": "loop", "old": "old loop (previous commit)"}
  short = {"scan": "scanned", "loop": "loop", "old": "old"}
  print(f"\n{env['machine']}; {env['date']}; {args.repeats} repeats, medians; load average "
        f"{env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f}; "
        f"{env['total_s'] / 60:.1f} min\n")
  for title, key in (("Whole-process wall time (s)", "wall_s"),
                     ("Whole-process CPU time, user + sys (s)", "cpu_s"),
                     ("Train step trace + lower + XLA compile (s, from JAX_LOG_COMPILES)",
                      "step_jit_s"),
                     ("Train step XLA compile only (s)", "step_compile_s"),
                     ("All jitted functions, trace + lower + compile (s)", "all_jit_s")):
    base = {m: med(rows(m, layer_counts[0]), key) for m in modes}
    print(f"{title}:\n")
    print("| layers | " + " | ".join(f"{names[m]}" for m in modes) + " | "
          + " | ".join(f"{short[m]}(L)/{short[m]}({layer_counts[0]})" for m in modes) + " |")
    print("|---:|" + "---:|" * (2 * len(modes)))
    for layers in layer_counts:
      vals = {m: med(rows(m, layers), key) for m in modes}
      ratios = [vals[m] / base[m] if vals[m] and base[m] else None for m in modes]
      print(f"| {layers} | " + " | ".join(fmt(vals[m]) for m in modes) + " | "
            + " | ".join(fmt(x, ".2f") for x in ratios) + " |")
    print()
  print("Per-repeat whole-process wall time (s):\n")
  print("| layers | mode | " + " | ".join(f"repeat {i + 1}" for i in range(args.repeats)) + " |")
  print("|---:|---|" + "---:|" * args.repeats)
  for layers in layer_counts:
    for m in modes:
      print(f"| {layers} | {names[m]} | "
            + " | ".join(f"{r['wall_s']:.1f}" for r in rows(m, layers)) + " |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"env": env, "runs": runs}, f, indent=2)


if __name__ == "__main__":
  main()
