"""Benchmark: pretraining train-step throughput (tokens/s) of BERT and GPT on the local devices.

A `--models` entry is a BERT size (`tiny`, `mini`, `small`, ...: `models/bert_<name>.gin` +
`objectives/bert.gin` + `runs/pretrain.gin`) or a decoder config (`gpt_tiny`,
`modern_decoder_tiny`, `gpt2_small`, `deepseek_tiny`, ...: `models/<name>.gin` +
`objectives/causal_lm.gin` + `runs/gpt_pretrain.gin`, max_positions raised to the sequence
length if needed) or a T5 config (`t5_tiny`, `t5_small`, ...: `models/<name>.gin` +
`objectives/t5_span_corruption.gin` + `runs/t5_pretrain.gin`, encoder inputs of seq_len and
targets of seq_len / 4; tokens/s counts both).

For each model config and compute dtype: build the real `trainer.Setup` (AdamW, MLM + NSP or
causal LM loss, data-parallel mesh over the visible devices), pre-fetch a few real host batches
from the bundled BBC task into memory (so the input pipeline is NOT measured; the
host-to-device copy of each batch inside `Setup.train_step` is), time the first step (compile +
one step), warm up, then time `--steps` steps `--repeats` times and report the median. Repeats
are interleaved across configs (round 1 runs every config, then round 2, ...) so that load from
other processes on a shared machine hits all configs alike: compare the same-run ratios printed
at the end.

  .venv/bin/python scripts/benchmark_train_step.py --models mini,small --batch_size 32 \
      --seq_len 128 --steps 20 --dtypes float32,bfloat16 --output /tmp/bench.json
  .venv/bin/python scripts/benchmark_train_step.py --models gpt_tiny,modern_decoder_tiny \
      --batch_size 32 --seq_len 128 --steps 10 --dtypes float32

Tokens/s counts batch x sequence length per step (padding included). Ratios compare every
model with the first one in --models.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import datetime
import itertools
import json
import platform
import statistics
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

absl_logging.set_verbosity(absl_logging.ERROR)  # seqio's "uncached FunctionDataset" warning
NUM_BATCHES = 4  # distinct real batches held in memory and cycled through
BERT_SIZES = ("tiny", "mini", "small", "base", "large")


# The shapes scripts/benchmark_vs_hf.py trains side by side with transformers: a config of
# ours plus bindings (the names work as --models everywhere).
PEER_SHAPES = {
    "hf_bert_mini": ("mini", ("BertConfig.vocab_size = 30522",)),
    "hf_gpt2": ("gpt_tiny", ("GptConfig.vocab_size = 50257", "GptConfig.dropout_rate = 0.1")),
    "hf_llama": ("modern_decoder_tiny", (
        "GptConfig.vocab_size = 32000", "GptConfig.num_kv_heads = 4",
        "GptConfig.mlp_dim = 1024")),
    "hf_t5": ("t5_tiny", (
        "T5Config.vocab_size = 32128", "T5Config.d_model = 256", "T5Config.d_ff = 1024",
        "T5Config.d_kv = 64", "T5Config.num_layers = 4", "T5Config.mlp = 'relu'",
        "T5Config.tie_embeddings = True", "T5Config.dropout_rate = 0.1")),
    "hf_deepseek_v3": ("deepseek_tiny", (
        "DeepSeekConfig.vocab_size = 32000", "DeepSeekConfig.num_layers = 2",
        "DeepSeekConfig.dense_mlp_dim = 1024", "DeepSeekConfig.mtp_depth = 0",
        "MoeConfig.num_experts = 8", "MoeConfig.top_k = 2", "MoeConfig.expert_dim = 256",
        "MoeConfig.num_groups = 1", "MoeConfig.top_groups = 1",
        "MoeConfig.bias_update_rate = 0.0")),  # transformers keeps its router bias fixed
}


def model_name(model: str) -> str:
  """`mini` -> `bert_mini`; decoder configs (`gpt_tiny`) keep their name."""
  return f"bert_{model}" if model in BERT_SIZES else model


def configure_model(model: str, dtype: str, seq_len: int) -> None:
  """Parses the gin configs that pretrain `model` with `dtype` compute at `seq_len` tokens."""
  if model in PEER_SHAPES:
    base, bindings = PEER_SHAPES[model]
    configure_model(base, dtype, seq_len)
    configure([], list(bindings))
    return
  gin.clear_config()
  name = model_name(model)
  if name.startswith("bert_"):
    configure([f"models/{name}.gin", "objectives/bert.gin", "runs/pretrain.gin"],
              ["BertConfig.vocab_size = 8053", f"BertConfig.dtype = '{dtype}'"])
    return
  if name.startswith("t5"):  # encoder inputs of seq_len, span-corruption targets of seq_len / 4
    configure([f"models/{name}.gin", "objectives/t5_span_corruption.gin", "runs/t5_pretrain.gin"],
              ["T5Config.vocab_size = 8128", f"T5Config.dtype = '{dtype}'",
               f"feature_lengths.targets_length = {seq_len // 4}"])
    return
  cfg = "DeepSeekConfig" if name.startswith("deepseek") else "GptConfig"
  configure([f"models/{name}.gin", "objectives/causal_lm.gin", "runs/gpt_pretrain.gin"],
            [f"{cfg}.vocab_size = 8128", f"{cfg}.dtype = '{dtype}'"])
  if bound(f"{cfg}.max_positions") < seq_len:  # learned position tables stop there
    configure([], [f"{cfg}.max_positions = {seq_len}"])


class Bench:
  """One (model, dtype, batch size): its Setup, state and in-memory batches."""

  def __init__(self, model: str, dtype: str, batch_size: int, seq_len: int, warmup: int,
               bindings: tuple[str, ...] = ()):
    configure_model(model, dtype, seq_len)
    configure([], list(bindings))  # on top of the model's configs
    q = bound
    self.setup = trainer.Setup(q("train.model"), q("train.loss_fn"), num_steps=1000)
    self.state = self.setup.init_state()
    lengths = pipeline.feature_lengths(seq_len)
    data = pipeline.TrainBatches(q("train.task"), lengths, q("train.feature_converter"),
                                 batch_size, seed=0)
    # tokens a step processes: an encoder-decoder reads inputs and writes targets
    targets_len = pipeline.decoder_length(seq_len)
    self.tokens_per_step = batch_size * (seq_len + (targets_len or 0))
    self.batches = itertools.cycle([next(data) for _ in range(NUM_BATCHES)])
    flops = self.setup.flops_per_token and self.setup.flops_per_token(seq_len, targets_len)
    self.result = {"model": model_name(model), "dtype": dtype, "batch_size": batch_size,
                   "seq_len": seq_len, "flops_per_token": flops, "step_s_repeats": [],
                   "params": int(sum(x.size for x in jax.tree.leaves(self.state.params)))}
    self.result["first_step_s"] = self.run(1)  # trace + compile + one step
    self.run(warmup)

  def run(self, steps: int) -> float:
    """Seconds per step over `steps` steps, waiting for the last one to finish."""
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, self.metrics = self.setup.train_step(self.state, next(self.batches))
    jax.block_until_ready(self.metrics)
    return (time.perf_counter() - t0) / max(steps, 1)

  def compiled_flops(self) -> float:
    """FLOPs of one train step by XLA's cost analysis of the compiled step (a while loop's body
    counts once: unrolled stacks count every layer)."""
    return float(self.compiled().cost_analysis()["flops"])

  def compiled(self):
    """The train step compiled for this bench's batches (a fresh compile, not the jit cache's)."""
    return self.setup.compile_step(self.setup.batch_to_device(next(self.batches)))

  def finish(self) -> dict:
    r = self.result
    r["step_s"] = statistics.median(r["step_s_repeats"])
    r["steps_per_s"] = 1 / r["step_s"]
    r["tokens_per_s"] = self.tokens_per_step / r["step_s"]
    r["gflops_per_s"] = (r["flops_per_token"] * r["tokens_per_s"] / 1e9
                         if r["flops_per_token"] else None)
    r["last_loss"] = float(self.metrics["loss"][0] / self.metrics["loss"][1])
    return r


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="mini,small",
                 help="comma list of BERT sizes (tiny, mini, small, ...) and decoder configs "
                      "(gpt_tiny, modern_decoder_tiny, gpt2_small, ...)")
  p.add_argument("--batch_size", default="32", help="comma list, e.g. 8,32")
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--output", help="also write the results as JSON here")
  args = p.parse_args()
  models, dtypes = args.models.split(","), args.dtypes.split(",")
  batch_sizes = [int(b) for b in args.batch_size.split(",")]

  env = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
         "jax": jax.__version__, "devices": [str(d) for d in jax.devices()],
         "cpu_count": os.cpu_count(), "processor": platform.processor() or platform.machine(),
         "argv": sys.argv[1:], "loadavg_start": os.getloadavg()}
  benches = []
  for model, bs, dtype in itertools.product(models, batch_sizes, dtypes):
    benches.append(Bench(model, dtype, bs, args.seq_len, args.warmup))
    print(f"# set up {model} {dtype} b={bs}: first step "
          f"{benches[-1].result['first_step_s']:.1f} s", file=sys.stderr, flush=True)
  # Repeats are interleaved (round r times every config once) so that load from other
  # processes on a shared machine hits all configs alike and ratios within a run stay fair.
  for rep in range(args.repeats):
    for b in benches:
      b.result["step_s_repeats"].append(b.run(args.steps))
    print(f"# round {rep + 1}/{args.repeats}: " + ", ".join(
        f"{b.result['model']} {b.result['dtype']} {b.result['step_s_repeats'][-1] * 1e3:.0f} ms"
        for b in benches), file=sys.stderr, flush=True)
  results = [b.finish() for b in benches]
  env["loadavg_end"] = os.getloadavg()

  print(f"\njax {env['jax']}, {env['devices']}, {env['cpu_count']} CPUs, {env['date']}, "
        f"load average {env['loadavg_start'][0]:.1f} -> {env['loadavg_end'][0]:.1f}\n")
  print("| model | params | dtype | batch | seq | first step (s) | step (ms) | steps/s "
        "| tokens/s | GFLOP/s |")
  print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
  for r in results:
    gf = f"{r['gflops_per_s']:.1f}" if r["gflops_per_s"] else "-"
    print(f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['dtype']} | {r['batch_size']} "
          f"| {r['seq_len']} | {r['first_step_s']:.1f} | {r['step_s'] * 1e3:.0f} "
          f"| {r['steps_per_s']:.2f} | {r['tokens_per_s']:.0f} | {gf} |")

  by_key = {(r["model"], r["dtype"], r["batch_size"]): r for r in results}
  base_name = model_name(models[0])
  ratios = {}  # same-run ratios of tokens/s: what to compare across runs and machines
  for (model, dtype, bs), r in by_key.items():
    base, f32 = by_key.get((base_name, dtype, bs)), by_key.get((model, "float32", bs))
    if base and model != base_name:
      ratios[f"{model}/{base_name} {dtype} b{bs}"] = r["tokens_per_s"] / base["tokens_per_s"]
    if f32 and dtype != "float32":
      ratios[f"{model} {dtype}/float32 b{bs}"] = r["tokens_per_s"] / f32["tokens_per_s"]
  print("".join(f"\n{name} tokens/s: {value:.3f}" for name, value in ratios.items()))
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"env": env, "results": results, "ratios": ratios}, f, indent=2)


if __name__ == "__main__":
  main()
