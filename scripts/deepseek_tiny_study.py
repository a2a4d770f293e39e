"""Two studies on the tiny DeepSeek (experiments/deepseek_tiny_cpu.gin: 4 layers, the first a
dense SwiGLU of 704; MLA; MTP depth 1), every arm trained through the CLI with the same seed,
data, steps, batch and length.

moe_vs_dense: DeepSeekMoE's claim (Dai et al. 2024), at equal activated parameters per token
the fine-grained MoE beats a dense model. Only the FFN of layers 2-4, and of the MTP block that
copies them, differs (DeepSeekConfig.moe_layer_dense_dim):

  moe          DeepSeekMoE: 1 shared + top-4 of 16 routed experts, SwiGLU width 64 each
  dense        SwiGLU 325, the MoE layer's activated parameters: 3 * 256 * W = 768 W against
               5 experts * 768 * 64 + the 256 * 16 router = 249,856, W = 325.3 (256 short)
  dense_total  SwiGLU 1093, the MoE layer's total (the paper's upper bound): 17 * 768 * 64
               + 4,096 = 839,680 = 768 W, W = 1093.3 (256 short)

precision: the MoE trained in fp32, in bf16 compute (f32 master weights) and with FP8 matmuls
(precision/fp8.gin: DeepSeek-V3's e4m3 tiles, emulated on CPU).

  .venv/bin/python scripts/deepseek_tiny_study.py moe_vs_dense --model_dirs runs/moe_vs_dense
  .venv/bin/python scripts/deepseek_tiny_study.py precision --model_dirs runs/precision

An arm whose model_dir holds a finished run is not retrained and an interrupted one resumes from
its checkpoint, so rerunning the command continues the study; --reuse ARM=DIR reads an existing
run instead (the MoE arm of one study is the fp32 arm of the other). Prints the markdown table
and writes it, with the loss curves, to --out_dir as STUDY.md and STUDY.png. Losses are the
next-token cross-entropy, ln(perplexity): the logged `loss` adds the MTP term (λ = 0.3), which
all arms share.
"""

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIN_FILE = "experiments/deepseek_tiny_cpu.gin"
# study: {arm: (gin files, bindings, what differs, in words)}
STUDIES = {
    "moe_vs_dense": {
        "moe": ([], [], "MoE: 1 shared + top-4 of 16 × 64"),
        "dense": ([], ["DeepSeekConfig.moe_layer_dense_dim=325"],
                  "dense SwiGLU 325 (= activated)"),
        "dense_total": ([], ["DeepSeekConfig.moe_layer_dense_dim=1093"],
                        "dense SwiGLU 1093 (= total)")},
    "precision": {
        "fp32": ([], [], "fp32"),
        "bf16": ([], ["DeepSeekConfig.dtype='bfloat16'"], "bf16 compute, f32 master weights"),
        "fp8": (["precision/fp8.gin"], [], "FP8 e4m3 tiles (1×128, 128×128), f32 master")},
}


def _cli(verb: str, gin_files: list[str], bindings: list[str], *extra: str) -> list[str]:
  return [sys.executable, "-m", "pretrain_jax", verb,
          *(f"--gin_file={f}" for f in [GIN_FILE, *gin_files]), *extra,
          *(f"--gin.{b}" for b in bindings)]


def info(gin_files: list[str], bindings: list[str]) -> dict:
  """`info --json`: the counts from shapes, by the model's own convention."""
  out = subprocess.run(_cli("info", gin_files, bindings, "--json"), cwd=REPO, check=True,
                       capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def saved_config(model_dir: str) -> dict[str, str]:
  """NAME = VALUE of the run's config.gin (what the trainer last ran it with)."""
  path = os.path.join(model_dir, "config.gin")
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return dict(m.groups() for m in re.finditer(r"^([\w.]+) = (.*)$", f.read(), re.M))


def bound_names(gin_file: str) -> set[str]:
  """The NAMEs a gin file (in gin_configs/) binds: what its arm is meant to change."""
  with open(os.path.join(REPO, "gin_configs", gin_file)) as f:
    return set(re.findall(r"^([\w.]+) = ", f.read(), re.M))


def read_metrics(model_dir: str) -> list[dict]:
  path = os.path.join(model_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def finished(model_dir: str, steps: int) -> bool:
  """Its last train row and (when it evaluates) its last held-out row are at `steps`."""
  config, records = saved_config(model_dir), read_metrics(model_dir)
  done = {r["split"] for r in records if r["step"] >= steps}
  return "train" in done and (config.get("train.eval_every") == "0" or len(done) > 1)


def train(arm: str, model_dir: str, gin_files: list[str], bindings: list[str],
          steps: int) -> None:
  if finished(model_dir, steps):
    print(f"{arm}: {model_dir} is finished at step {steps}; not retrained", flush=True)
    return
  recorded = saved_config(model_dir).get("train.num_steps")
  if recorded not in (None, str(steps)):  # resuming would mix two learning-rate schedules
    sys.exit(f"{model_dir} holds a run of {recorded} steps, not {steps}: remove it or "
             "choose another --model_dirs")
  print(f"{arm}: training into {model_dir}", flush=True)
  subprocess.run(_cli("train", gin_files, bindings, f"--model_dir={model_dir}", "--no_progress"),
                 cwd=REPO, check=True)


def summarize(arm: str, label: str, model_dir: str, counts: dict) -> dict:
  records = read_metrics(model_dir)
  ce = lambda r: math.log(r["perplexity"]) if r.get("perplexity") else float("nan")
  held_out = [r for r in records if r["split"] != "train"]
  train_rows = [r for r in records if r["split"] == "train"]
  speeds = [r["tokens_per_sec"] for r in train_rows[1:] or train_rows]  # the first compiles
  return {"arm": arm, "model_dir": model_dir, "label": label,
          "total_params": counts["total_params"], "mtp_params": counts["mtp_params"],
          "activated_params": counts["activated_params"],
          "held_out_ce": {r["step"]: ce(r) for r in held_out},
          "train_ce": {r["step"]: ce(r) for r in train_rows},
          "final_held_out_loss": held_out[-1]["loss"] if held_out else float("nan"),
          "final_perplexity": held_out[-1]["perplexity"] if held_out else float("nan"),
          "tokens_per_sec": statistics.median(speeds) if speeds else float("nan")}


def check_same_training(results: list[dict], expected: set[str]) -> None:
  """Warns where the runs' saved configs differ beyond the arms' own settings (a reused run
  trained with other settings, say)."""
  configs = [saved_config(r["model_dir"]) for r in results]
  keys = set().union(*configs) - expected
  for key in sorted(k for k in keys if len({c.get(k) for c in configs}) > 1):
    print(f"warning: the runs differ in {key}: "
          + ", ".join(f"{r['arm']} {c.get(key)}" for r, c in zip(results, configs)),
          file=sys.stderr)


def markdown(results: list[dict], command: str) -> str:
  steps = sorted(set().union(*(r["held_out_ce"] for r in results)))
  n = lambda x: f"{x:,}"
  header = (["arm", "what differs", "total params (MTP)", "activated / token"]
            + [f"held-out CE, step {s}" for s in steps]
            + ["final held-out loss (+ MTP)", "final perplexity", "train tokens/s"])
  lines = ["| " + " | ".join(header) + " |", "|---|---" + "|---:" * (len(header) - 2) + "|"]
  for r in results:
    cells = ([r["arm"], r["label"], f"{n(r['total_params'])} ({n(r['mtp_params'])})",
              n(r["activated_params"])]
             + [f"{r['held_out_ce'][s]:.3f}" if s in r["held_out_ce"] else "–" for s in steps]
             + [f"{r['final_held_out_loss']:.3f}", f"{r['final_perplexity']:.1f}",
                f"{r['tokens_per_sec']:,.0f}"])
    lines.append("| " + " | ".join(cells) + " |")
  return (f"Command: `{command}`\n\n" + "\n".join(lines) + "\n\n"
          "CE: next-token cross-entropy in nats, ln(perplexity); the loss adds the MTP term. "
          "Activated: `info --json`, the DeepSeek papers' convention (the shared and top-k "
          "experts, one embedding row; the MTP block is not counted). Tokens/s: median of the "
          "logged train windows after the first (which compiles).\n")


def plot(results: list[dict], path: str) -> None:
  """Held-out and train CE per step, and each arm's CE minus the first arm's (the differences
  are small beside the fall from step 0)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
  base = results[0]
  for r in results:
    label = f"{r['arm']}: {r['label']}"
    for ax, key, marker in ((axes[0], "held_out_ce", "o"), (axes[1], "train_ce", None)):
      points = sorted(r[key].items())
      if points:
        ax.plot(*zip(*points), marker=marker, ms=4, label=label)
    steps = sorted(set(r["train_ce"]) & set(base["train_ce"]))
    axes[2].plot(steps, [r["train_ce"][s] - base["train_ce"][s] for s in steps], label=label)
    steps = sorted(set(r["held_out_ce"]) & set(base["held_out_ce"]))
    axes[2].plot(steps, [r["held_out_ce"][s] - base["held_out_ce"][s] for s in steps], "o",
                 ms=4, color=axes[2].lines[-1].get_color())
  titles = ("held-out next-token CE", "train next-token CE",
            f"CE minus {base['arm']}'s (line: train, dots: held out)")
  for ax, title in zip(axes, titles):
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("study", choices=list(STUDIES))
  parser.add_argument("--model_dirs", help="root: each arm trains into MODEL_DIRS/ARM "
                      "(default runs/STUDY)")
  parser.add_argument("--reuse", action="append", default=[], metavar="ARM=DIR",
                      help="a finished run (same steps and settings) to read for ARM")
  parser.add_argument("--out_dir", default=os.path.join(REPO, "docs"),
                      help="writes STUDY.md and STUDY.png here")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--arms", nargs="+", help="a subset of the study's arms")
  parser.add_argument("--gin", action="append", default=[], metavar="NAME=VALUE",
                      help="a binding for every arm (repeatable), e.g. train.eval_every=2")
  args = parser.parse_args()
  arms = STUDIES[args.study]
  unknown = sorted(set(args.arms or []) - set(arms))
  if unknown:
    sys.exit(f"--arms {unknown[0]!r}: the {args.study} study's arms are {list(arms)}")
  reuse = dict(item.split("=", 1) for item in args.reuse)
  model_dirs = args.model_dirs or os.path.join("runs", args.study)
  results, expected = [], set()
  for arm in args.arms or arms:
    gin_files, own, label = arms[arm]
    bindings = [f"train.num_steps={args.steps}", *args.gin, *own]
    expected |= {b.split("=", 1)[0] for b in own}.union(*map(bound_names, gin_files))
    model_dir = os.path.abspath(reuse.get(arm) or os.path.join(model_dirs, arm))
    if arm in reuse:
      if not finished(model_dir, args.steps):
        sys.exit(f"--reuse {arm}={model_dir} holds no run finished at step {args.steps}")
    else:
      train(arm, model_dir, gin_files, bindings, args.steps)
    results.append(summarize(arm, label, model_dir, info(gin_files, bindings)))
  check_same_training(results, expected)
  os.makedirs(args.out_dir, exist_ok=True)
  plot(results, os.path.join(args.out_dir, f"{args.study}.png"))
  table = markdown(results, "python scripts/deepseek_tiny_study.py " + " ".join(sys.argv[1:]))
  print(table)
  with open(os.path.join(args.out_dir, f"{args.study}.md"), "w") as f:
    f.write(table)


if __name__ == "__main__":
  main()
