"""Benchmark: what one change costs or saves, as step-time ratios inside one process.

Each --variant is `name=binding;binding;...` (gin bindings on top of a
`benchmark_train_step.py` model: mini, gpt_tiny, ..., or a peer shape such as hf_llama); the first
variant is the reference. Rounds are interleaved over the variants, and each ratio is the
median over rounds of (variant step time / reference step time in the same round).

  .venv/bin/python scripts/benchmark_variants.py --model hf_llama \\
      --variant "base=" --variant "no_rope=GptConfig.positions = 'learned'" \\
      --variant "gelu=GptConfig.mlp = 'gelu'" --variant "tied=GptConfig.tie_embeddings = True"
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import datetime
import json
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_train_step as bts  # noqa: E402  (same directory)
from benchmark_compile import machine_line  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", required=True, help="a benchmark_train_step model (mini, gpt_tiny, "
                 f"..., or one of {', '.join(bts.PEER_SHAPES)})")
  p.add_argument("--variant", action="append", required=True, help="name=binding;binding")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--output")
  args = p.parse_args()
  started = datetime.datetime.now().isoformat(timespec="seconds")
  benches = {}
  for spec in args.variant:
    name, _, bindings = spec.partition("=")
    extra = tuple(b.strip() for b in bindings.split(";") if b.strip())
    benches[name] = bts.Bench(args.model, "float32", args.batch_size, args.seq_len,
                              args.warmup, bindings=extra)
    benches[name].result["bindings"] = list(extra)
    print(f"# set up {name}: first step {benches[name].result['first_step_s']:.1f} s",
          file=sys.stderr, flush=True)
  for r in range(args.rounds):
    for b in benches.values():
      b.result["step_s_repeats"].append(b.run(args.steps))
    print(f"# round {r + 1}: " + ", ".join(
        f"{n} {b.result['step_s_repeats'][-1] * 1e3:.0f} ms" for n, b in benches.items()),
        file=sys.stderr, flush=True)
  reference = next(iter(benches.values())).result["step_s_repeats"]
  print(f"\n{machine_line()}; {started}; {args.model}, batch {args.batch_size} x "
        f"{args.seq_len}, fp32, {args.rounds} rounds x {args.steps} steps\n")
  print("| variant | bindings | step (ms) | tokens/s | step / first variant |")
  print("|---|---|---:|---:|---:|")
  rows = []
  for name, b in benches.items():
    r = b.finish()
    r["ratio"] = statistics.median(s / ref for s, ref in zip(r["step_s_repeats"], reference))
    rows.append({"variant": name, **r})
    print(f"| {name} | {'; '.join(r['bindings']) or '-'} | {r['step_s'] * 1e3:.0f} | "
          f"{r['tokens_per_s']:,.0f} | {r['ratio']:.3f} |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"machine": machine_line(), "started": started, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  main()
