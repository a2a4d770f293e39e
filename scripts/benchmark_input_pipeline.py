"""Benchmark: does the host input pipeline keep up with the train step?

For each experiment config (default: the three CPU quickstarts), in one process:

  1. the host pipeline alone, exactly as `train` builds it (`pipeline.TrainBatches`: SeqIO
     task, shuffling, masking or span corruption, feature converter, batching, prefetch):
     seconds to the first batch of an epoch (the shuffle buffer fills first) and batches/s
     after it;
  2. the train step alone, fed batches already in memory: steps/s;
  3. the train step fed live from the pipeline, as `train` runs it: steps/s, so the cost of
     sharing the host's cores with tf.data shows up as a ratio to (2).

The headline is pipeline batches/s ÷ step steps/s (goal ≥ 5: the pipeline needs a fifth of a
core-share the step leaves it). Run on an idle machine:

  .venv/bin/python scripts/benchmark_input_pipeline.py \
      --configs experiments/bert_tiny_cpu.gin,experiments/gpt_tiny_cpu.gin,experiments/t5_tiny_span_corruption_cpu.gin
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import itertools
import json
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin
import jax
from absl import logging as absl_logging

from pretrain_jax import registry  # noqa: F401  (gin configurables and tasks)
from pretrain_jax.config import bound, configure
from pretrain_jax.data import pipeline
from pretrain_jax.training import trainer

absl_logging.set_verbosity(absl_logging.ERROR)
DEFAULT_CONFIGS = ("experiments/bert_tiny_cpu.gin,experiments/gpt_tiny_cpu.gin,"
                   "experiments/t5_tiny_span_corruption_cpu.gin")


def _batches(seed: int) -> pipeline.TrainBatches:
  length = bound("train.sequence_length")
  return pipeline.TrainBatches(bound("train.task"), pipeline.feature_lengths(length),
                               bound("train.feature_converter"), bound("train.batch_size"),
                               seed)


def _steps_per_s(setup, state, batches, steps: int):
  """(steps/s over `steps` steps, state), waiting for the last step to finish."""
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = setup.train_step(state, next(batches))
  jax.block_until_ready(metrics)
  return steps / (time.perf_counter() - t0), state


def measure(config: str, num_batches: int, steps: int) -> dict:
  gin.clear_config()
  configure([config], [])
  length, batch_size = bound("train.sequence_length"), bound("train.batch_size")
  targets_len = pipeline.decoder_length(length)
  r = {"config": config, "batch_size": batch_size, "sequence_length": length,
       "tokens_per_batch": batch_size * (length + (targets_len or 0))}

  t0 = time.perf_counter()
  data = _batches(seed=0)
  next(data)
  r["first_batch_s"] = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(num_batches):
    next(data)
  r["pipeline_batches_per_s"] = num_batches / (time.perf_counter() - t0)

  setup = trainer.Setup(bound("train.model"), bound("train.loss_fn"), num_steps=1000)
  state = setup.init_state()
  cached = itertools.cycle([next(data) for _ in range(4)])
  _, state = _steps_per_s(setup, state, cached, 3)  # compile and warm up
  r["step_steps_per_s"], state = _steps_per_s(setup, state, cached, steps)
  live = _batches(seed=1)
  next(live)  # the epoch's start is measured above, not here
  r["live_steps_per_s"], state = _steps_per_s(setup, state, live, steps)
  r["headroom"] = r["pipeline_batches_per_s"] / r["step_steps_per_s"]
  r["live_over_cached"] = r["live_steps_per_s"] / r["step_steps_per_s"]
  return r


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma list of gin files")
  p.add_argument("--batches", type=int, default=200, help="host batches timed per config")
  p.add_argument("--steps", type=int, default=30, help="train steps timed per measurement")
  p.add_argument("--output", help="also write the results as JSON here")
  args = p.parse_args()
  env = {"jax": jax.__version__, "cpu_count": os.cpu_count(),
         "processor": platform.processor() or platform.machine(),
         "argv": sys.argv[1:], "loadavg_start": os.getloadavg()}
  results = []
  for config in args.configs.split(","):
    results.append(measure(config, args.batches, args.steps))
    print(f"# {config}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
  env["loadavg_end"] = os.getloadavg()
  print(f"\njax {env['jax']}, {env['cpu_count']} CPUs, load average "
        f"{env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f}\n")
  print("| config | batch × length | epoch start (s) | pipeline batches/s | step steps/s "
        "| pipeline / step | steps/s fed live | live / cached |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['config']} | {r['batch_size']} × {r['sequence_length']} "
          f"| {r['first_batch_s']:.2f} | {r['pipeline_batches_per_s']:.1f} "
          f"| {r['step_steps_per_s']:.2f} | {r['headroom']:.1f}× | {r['live_steps_per_s']:.2f} "
          f"| {r['live_over_cached']:.3f} |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"env": env, "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
