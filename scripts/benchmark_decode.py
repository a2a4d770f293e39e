"""Benchmark: greedy decoding throughput of the GPT family, KV cache vs. full recomputation.

For each decoder config (`models/<name>.gin`, random weights, vocab 8128) and batch size:
random prompts of `--prompt_len` tokens are continued by `--new_tokens` tokens, greedily, in
two ways:

- **kv_cache**: `inference.decoding.generate` (one jitted program: prefill the prompt into the
  KV cache, then one token per step);
- **recompute**: no cache; one jitted program that, for each new token, runs the whole model
  over a fixed buffer of prompt_len + new_tokens tokens (causal, so the not-yet-written tail
  does not matter) and takes the argmax at the last written position.

The first call of each (compile + one run) is timed separately; then each repeat times
`--calls` calls and keeps the mean, and the median over repeats is reported. Repeats are
interleaved across configs (round 1 runs everything, then round 2, ...) so that load from
other processes on a shared machine hits all configs alike: compare the same-run ratios.

Tokens/s = batch x new tokens / wall time of one call, prefill included (the host-side
padding and the copy of the result back are included too).

  .venv/bin/python scripts/benchmark_decode.py --models gpt_tiny,modern_decoder_tiny \\
      --batch_sizes 1,8 --prompt_len 16 --new_tokens 64 --output /tmp/decode.json
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import datetime
import functools
import itertools
import json
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gin
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from pretrain_jax import registry  # noqa: F401  (gin configurables and tasks)
from pretrain_jax.config import bound, configure
from pretrain_jax.inference import decoding

VOCAB_SIZE = 8128  # the bundled BBC SentencePiece vocabulary, padded to 64s


def build_model(name: str, dtype: str, max_len: int) -> nnx.Module:
  """`models/<name>.gin` with random weights, max_positions raised to `max_len` if needed."""
  gin.clear_config()
  configure([f"models/{name}.gin"], [f"GptConfig.vocab_size = {VOCAB_SIZE}",
                                     f"GptConfig.dtype = '{dtype}'"])
  if bound("GptConfig.max_positions") < max_len:
    configure([], [f"GptConfig.max_positions = {max_len}"])
  return bound("train.model")(0)


@functools.partial(jax.jit, static_argnames=("graphdef", "prompt_len"))
def _recompute(graphdef, state, buffer_BT, *, prompt_len: int):
  """Greedy decoding without a cache: the full forward pass over the buffer for every token."""
  model = nnx.merge(graphdef, state)

  def step(i, buffer_BT):
    h_BTD = model(buffer_BT, return_hidden=True)
    logits_B1V = model.logits(jax.lax.dynamic_slice_in_dim(h_BTD, i - 1, 1, axis=1))
    return buffer_BT.at[:, i].set(jnp.argmax(logits_B1V[:, 0], axis=-1).astype(jnp.int32))

  buffer_BT = jax.lax.fori_loop(prompt_len, buffer_BT.shape[1], step, buffer_BT)
  return buffer_BT[:, prompt_len:]


def generate_recompute(model, prompts, max_new_tokens: int) -> list[list[int]]:
  """Same prompts (all of one length) and output as `decoding.generate`, without the cache."""
  prompt_len = len(prompts[0])
  buffer = np.zeros((len(prompts), prompt_len + max_new_tokens), np.int32)
  buffer[:, :prompt_len] = prompts
  graphdef, state = nnx.split(model)
  return np.asarray(_recompute(graphdef, state, buffer, prompt_len=prompt_len)).tolist()


METHODS = {
    "kv_cache": lambda model, prompts, n: decoding.generate(model, prompts, n, eos_id=None),
    "recompute": generate_recompute,
}


class Bench:
  """One (model, batch size, method): its model, prompts and timings."""

  def __init__(self, model, name: str, batch: int, method: str, args):
    self.model, self.method, self.new_tokens = model, method, args.new_tokens
    rng = np.random.default_rng(batch)
    self.prompts = rng.integers(1, 8000, (batch, args.prompt_len)).tolist()
    self.result = {"model": name, "method": method, "batch_size": batch,
                   "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                   "dtype": args.dtype, "call_s_repeats": []}
    t0 = time.perf_counter()
    self.tokens = self.call()  # trace + compile + one call
    self.result["first_call_s"] = time.perf_counter() - t0

  def call(self) -> list[list[int]]:
    return METHODS[self.method](self.model, self.prompts, self.new_tokens)

  def run(self, calls: int) -> float:
    """Seconds per call over `calls` calls (each returns host lists, so it has finished)."""
    t0 = time.perf_counter()
    for _ in range(calls):
      self.call()
    return (time.perf_counter() - t0) / calls

  def finish(self) -> dict:
    r = self.result
    r["call_s"] = statistics.median(r["call_s_repeats"])
    r["tokens_per_s"] = r["batch_size"] * r["new_tokens"] / r["call_s"]
    return r


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
  """Fraction of generated tokens two methods agree on (greedy: ideally 1.0)."""
  pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b)]
  return sum(x == y for x, y in pairs) / len(pairs)


def print_table(results, env):
  print(f"\njax {env['jax']}, {env['devices']}, {env['cpu_count']} CPUs, {env['date']}, "
        f"load average {env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f}\n")
  print("| model | params | method | batch | prompt | new | first call (s) | call (ms) "
        "| tokens/s |")
  print("|---|---:|---|---:|---:|---:|---:|---:|---:|")
  for r in results:
    print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['method']} | {r['batch_size']} "
          f"| {r['prompt_len']} | {r['new_tokens']} | {r['first_call_s']:.1f} "
          f"| {r['call_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} |")


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="gpt_tiny,modern_decoder_tiny",
                 help="comma list of decoder configs (models/<name>.gin)")
  p.add_argument("--batch_sizes", default="1,8")
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--calls", type=int, default=3, help="timed calls per repeat")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtype", default="float32")
  p.add_argument("--no_recompute", action="store_true", help="skip the no-cache baseline")
  p.add_argument("--output", help="also write the results as JSON here")
  args = p.parse_args()
  batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
  methods = ["kv_cache"] if args.no_recompute else list(METHODS)

  env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
         "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
         "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
         "argv": sys.argv[1:], "loadavg_start": os.getloadavg()}
  benches = []
  for name in args.models.split(","):
    model = build_model(name, args.dtype, args.prompt_len + args.new_tokens)
    params = int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    for batch, method in itertools.product(batch_sizes, methods):
      benches.append(Bench(model, name, batch, method, args))
      benches[-1].result["params"] = params
      print(f"# set up {name} b={batch} {method}: first call "
            f"{benches[-1].result['first_call_s']:.1f} s", file=sys.stderr, flush=True)
  # Interleaved repeats: round r times every config once, so load hits all configs alike.
  for rep in range(args.repeats):
    for b in benches:
      b.result["call_s_repeats"].append(b.run(args.calls))
    print(f"# round {rep + 1}/{args.repeats}: " + ", ".join(
        f"{b.result['model']} b{b.result['batch_size']} {b.method} "
        f"{b.result['call_s_repeats'][-1] * 1e3:.0f} ms" for b in benches),
        file=sys.stderr, flush=True)
  results = [b.finish() for b in benches]
  env["loadavg_end"] = os.getloadavg()
  print_table(results, env)

  by_key = {(b.result["model"], b.result["batch_size"], b.method): b for b in benches}
  ratios = {}  # same-run ratios of tokens/s: what to compare across runs and machines
  for (name, batch, method), b in by_key.items():
    cached = by_key[(name, batch, "kv_cache")]
    if method == "recompute":
      ratios[f"{name} b{batch} kv_cache/recompute"] = (
          cached.result["tokens_per_s"] / b.result["tokens_per_s"])
      cached.result["agreement_with_recompute"] = agreement(cached.tokens, b.tokens)
    if method == "kv_cache" and batch != batch_sizes[0]:
      first = by_key[(name, batch_sizes[0], "kv_cache")]
      ratios[f"{name} kv_cache b{batch}/b{batch_sizes[0]}"] = (
          b.result["tokens_per_s"] / first.result["tokens_per_s"])
  print("".join(f"\n{name} tokens/s: {value:.3f}" for name, value in ratios.items()))
  for r in results:
    if "agreement_with_recompute" in r:
      print(f"{r['model']} b{r['batch_size']}: kv_cache and recompute agree on "
            f"{r['agreement_with_recompute']:.1%} of the generated tokens")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"env": env, "results": results, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
  main()
