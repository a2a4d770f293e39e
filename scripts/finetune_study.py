"""Finetuning study: from scratch vs full finetuning vs LoRA, Houlsby adapters and prefix
tuning, on BBC topics and movie-review polarity, from one pretrained tiny model.

    python scripts/finetune_study.py --base runs/bert_tiny --out_dir runs/finetune_study
    python scripts/finetune_study.py --family gpt --base runs/gpt_tiny --out_dir runs/finetune_study
    python scripts/finetune_study.py --family t5 --base runs/t5_tiny --out_dir runs/finetune_study
    python scripts/finetune_study.py --family minilm --base runs/minilm --out_dir runs/finetune_study

Each arm is one `pretrain-jax train` run (the experiment's gin files + peft/<method>.gin; every
arm but `scratch` starts from --base); then its whole test split is scored in-process
(inference/classify.py). Writes results.json, prints a markdown table (test accuracy ± its
standard error, trainable share, checkpoint bytes, train time) and plots finetune_study.png.
Arms already finished in --out_dir are reused (delete a run's folder to redo it).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time

import gin
import numpy as np

from pretrain_jax import registry  # noqa: F401  pylint: disable=unused-import
from pretrain_jax.config import configure
from pretrain_jax.inference import classify
from pretrain_jax.training import info

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {  # family -> task -> the experiment's gin files
    "bert": {"bbc": ["experiments/bert_tiny_bbc_topic.gin"],
             "polarity": ["experiments/bert_tiny_polarity.gin"]},
    "gpt": {"bbc": ["experiments/gpt_tiny_cpu.gin", "experiments/gpt_tiny_bbc_classifier.gin"],
            "polarity": ["experiments/gpt_tiny_cpu.gin", "experiments/gpt_tiny_bbc_classifier.gin",
                         "experiments/gpt_tiny_polarity.gin"]},
    "t5": {"bbc": ["experiments/t5_tiny_bbc_topic.gin"],
           "polarity": ["experiments/t5_tiny_polarity.gin"]},
    # a real pretrained BERT: `pretrain-jax import-bert` of all-MiniLM-L6-v2 (--base its out_dir)
    "minilm": {"bbc": ["experiments/minilm_bbc_topic.gin"],
               "polarity": ["experiments/minilm_polarity.gin"]},
}
# The gin name of each family's peak learning rate (T5's Adafactor runs at a constant one).
LEARNING_RATE_BINDING = {"bert": "warmup_linear_decay.learning_rate",
                         "gpt": "warmup_linear_decay.learning_rate",
                         "t5": "rsqrt_decay.learning_rate",
                         "minilm": "warmup_linear_decay.learning_rate"}
METHODS = ("scratch", "full", "lora", "adapters", "prefix")
# Learning rates, from short probes on each task (docs/finetuning.md): the lightweight methods
# train few weights from zero and take larger steps (LoRA's GLUE runs: 4e-4–5e-4 against full
# finetuning's 1e-5–3e-5). From scratch uses full finetuning's.
LEARNING_RATES = {
    ("bert", "bbc"): {"scratch": 3e-3, "full": 3e-3, "lora": 1e-2, "adapters": 3e-3,
                      "prefix": 1e-2},
    ("bert", "polarity"): {"scratch": 3e-4, "full": 3e-4, "lora": 3e-3, "adapters": 1e-3,
                           "prefix": 3e-3},
    # The rest are not probed and the same on both tasks. GPT: the classifier recipe's 5e-4
    # (experiments/gpt_tiny_bbc_classifier.gin) for scratch and full, BERT's ratios for the rest.
    **{("gpt", task): {"scratch": 5e-4, "full": 5e-4, "lora": 3e-3, "adapters": 1e-3,
                       "prefix": 3e-3} for task in ("bbc", "polarity")},
    # T5: its pretraining constant 1e-2 for scratch and full (the paper's finetuning 1e-3,
    # Raffel et al. §3.1.4, left t5_tiny at chance on polarity in 300 steps: test 0.496). The
    # methods' zero-initialised weights train without Adafactor's parameter scaling (below),
    # whose steps are then RMS-normalised as Adam's: 3e-3.
    **{("t5", task): {"scratch": 1e-2, "full": 1e-2, "lora": 3e-3, "adapters": 3e-3,
                      "prefix": 3e-3} for task in ("bbc", "polarity")},
    # MiniLM: BERT's range for full finetuning, ×10 for the methods that train new weights
    # from zero; from scratch ×3. Prefix at 3e-3 learnt for 20 steps, then its prefixes grew
    # (RMS 2) until the pooled output was the same for every input (polarity test 0.504).
    **{("minilm", task): {"scratch": 3e-4, "full": 1e-4, "lora": 1e-3, "adapters": 1e-3,
                          "prefix": 5e-4} for task in ("bbc", "polarity")},
}


def _peft_gin(method: str) -> str:
  return "peft/full.gin" if method in ("scratch", "full") else f"peft/{method}.gin"


def _bytes(directory: str) -> int:
  return sum(os.path.getsize(f) for f in glob.glob(f"{directory}/**", recursive=True)
             if os.path.isfile(f))


def _last_checkpoint_bytes(model_dir: str) -> int:
  """The bytes of the run's final checkpoint (a run may keep earlier steps beside it)."""
  steps = [int(n) for n in os.listdir(os.path.join(model_dir, "checkpoints")) if n.isdigit()]
  return _bytes(os.path.join(model_dir, "checkpoints", str(max(steps))))


def run_arm(family: str, task: str, method: str, base: str, out_dir: str,
            extra: list[str]) -> dict:
  model_dir = os.path.join(out_dir, f"{family}_{task}_{method}")
  done = os.path.join(model_dir, "study.json")
  if os.path.exists(done):
    return json.load(open(done))
  args = [sys.executable, "-m", "pretrain_jax", "train",
          *[f"--gin_file={f}" for f in TASKS[family][task]],
          f"--gin_file={_peft_gin(method)}", f"--model_dir={model_dir}", "--no_progress",
          f"--gin.{LEARNING_RATE_BINDING[family]}={LEARNING_RATES[family, task][method]}",
          *extra]
  if family == "t5" and method not in ("scratch", "full"):  # B = 0 would move at 1e-3 × lr
    args.append("--gin.make_optimizer.adafactor_parameter_scale=False")
  if family == "minilm":  # the tasks read the imported checkpoint's vocabulary
    args.append(f"--gin.VOCAB_FILE='{os.path.join(os.path.abspath(base), 'vocab.txt')}'")
  if method != "scratch":
    args.append(f"--gin.train.init_from='{os.path.abspath(base)}'")
  print(f"== {family} {task} / {method}: {' '.join(args[3:])}", flush=True)
  t0 = time.perf_counter()
  subprocess.run(args, check=True, cwd=REPO)
  seconds = time.perf_counter() - t0
  result = {"family": family, "task": task, "method": method, "train_seconds": seconds,
            "checkpoint_bytes": _last_checkpoint_bytes(model_dir),
            **_score(model_dir)}
  json.dump(result, open(done, "w"), indent=1)
  return result


def _score(model_dir: str) -> dict:
  """Test-split metrics and the trainable share, in a fresh gin config of the run's own."""
  gin.clear_config()
  configure([os.path.join(model_dir, "config.gin")], [])
  counts = info.model_info()
  return {**classify.evaluate(model_dir, "test", per_example=True),
          "trainable_params": counts["trainable_params"], "total_params": counts["total_params"],
          "trainable_fraction": counts["trainable_fraction"]}


def _correct(r: dict) -> np.ndarray:
  return np.asarray(r["labels"]) == np.asarray(r["predictions"])


def table(results: list[dict]) -> str:
  """Markdown; "vs scratch" / "vs full" are accuracy differences on the same test examples with
  their exact McNemar p-values (inference/classify.py)."""
  by_arm = {(r["family"], r["task"], r["method"]): r for r in results}

  def versus(r: dict, method: str) -> str:
    other = by_arm.get((r["family"], r["task"], method))
    if other is None or other is r or "labels" not in r or "labels" not in other:
      return "—"
    return (f"{r['accuracy'] - other['accuracy']:+.3f} "
            f"(p = {classify.mcnemar_p(_correct(r), _correct(other)):.2g})")

  lines = ["| model | task | method | test accuracy | vs scratch (paired p) | vs full | "
           "trainable | checkpoint | train time |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in results:
    lines.append(f"| {r['family']} | {r['task']} | {r['method']} | {r['accuracy']:.3f} ± "
                 f"{r['accuracy_stderr']:.3f} (n = {r['examples']}) | {versus(r, 'scratch')} | "
                 f"{versus(r, 'full') if r['method'] != 'scratch' else '—'} | "
                 f"{r['trainable_fraction']:.2%} ({r['trainable_params']:,}) | "
                 f"{r['checkpoint_bytes'] / 2**20:.2f} MiB | {r['train_seconds']:.0f} s |")
  return "\n".join(lines)


def plot(results: list[dict], path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  families = sorted({r["family"] for r in results})
  tasks = sorted({r["task"] for r in results})
  fig, axes = plt.subplots(len(families), len(tasks), figsize=(5 * len(tasks),
                                                               3.4 * len(families)),
                           squeeze=False)
  for row, family in enumerate(families):
    for ax, task in zip(axes[row], tasks):
      rows = [r for r in results if (r["family"], r["task"]) == (family, task)]
      xs = range(len(rows))
      ax.bar(xs, [r["accuracy"] for r in rows], yerr=[r["accuracy_stderr"] for r in rows],
             capsize=4, color=["#999999" if r["method"] == "scratch" else "#3b75af"
                               for r in rows])
      ax.set_xticks(list(xs), [f"{r['method']}\n{r['trainable_fraction']:.1%}" for r in rows])
      ax.set_ylim(0, 1)
      ax.set_title(f"{family} · {task}: test accuracy (± s.e.)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--base", required=True, help="the family's pretrained run (bert: the quickstart's; gpt: experiments/gpt_tiny_cpu.gin; "
                      "t5: experiments/t5_tiny_span_corruption_cpu.gin; minilm: import-bert's)")
  parser.add_argument("--out_dir", default="runs/finetune_study")
  parser.add_argument("--family", default="bert", choices=list(TASKS))
  parser.add_argument("--tasks", nargs="+", default=None, help="default: all of the family's")
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
  parser.add_argument("--gin", action="append", default=[],
                      help="extra binding for every arm, e.g. --gin train.num_steps=20")
  parser.add_argument("--plot", default=None, help="default: OUT_DIR/finetune_study.png")
  parser.add_argument("--pair", nargs=2, action="append", default=[], metavar=("A", "B"),
                      help="also print A's accuracy minus B's with McNemar's p, arms named "
                           "family_task_method, e.g. --pair minilm_bbc_full bert_bbc_scratch")
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  extra = [f"--gin.{b}" for b in args.gin]
  tasks = args.tasks or list(TASKS[args.family])
  unknown = sorted(set(tasks) - set(TASKS[args.family]))
  if unknown:
    parser.error(f"--tasks {unknown[0]} is not one of {args.family}'s: {list(TASKS[args.family])}")
  for t in tasks:
    for m in args.methods:
      run_arm(args.family, t, m, args.base, args.out_dir, extra)
  results = [json.load(open(f)) for f in sorted(glob.glob(f"{args.out_dir}/*/study.json"))]
  order = {m: i for i, m in enumerate(METHODS)}
  results.sort(key=lambda r: (r["family"], r["task"], order[r["method"]]))
  json.dump(results, open(os.path.join(args.out_dir, "results.json"), "w"), indent=1)
  print(table(results))
  by_name = {f"{r['family']}_{r['task']}_{r['method']}": r for r in results}
  for a, b in args.pair:
    missing = [n for n in (a, b) if "labels" not in by_name.get(n, {})]
    if missing:
      parser.error(f"--pair: no per-example results for {missing[0]} in {args.out_dir}")
    p = classify.mcnemar_p(_correct(by_name[a]), _correct(by_name[b]))
    print(f"{a} − {b}: {by_name[a]['accuracy'] - by_name[b]['accuracy']:+.3f} "
          f"(McNemar p = {p:.2g}, n = {by_name[a]['examples']})")
  plot(results, args.plot or os.path.join(args.out_dir, "finetune_study.png"))


if __name__ == "__main__":
  main()
