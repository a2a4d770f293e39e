"""Compile the accelerator paths for a TPU topology without a TPU: memory and FLOPs of each.

The real train step (`trainer.Setup.compile_step`: AdamW, the model's pretraining loss, the
batch shapes of its task) is lowered and compiled by libtpu (`pip install -e '.[tpu]'`) for a
data-parallel mesh over the devices of `--topology`, once per variant. Variants change one
thing at a time from the base (bf16 compute with fp32 master weights, attention spelled out,
no rematerialisation):

  fp32              compute dtype float32
  attention=xla     jax.nn.dot_product_attention(implementation='xla')
  attention=splash  TPU splash attention (a Pallas kernel, compiled by Mosaic)
  remat=P           BertConfig/GptConfig.remat_policy = P (jax.checkpoint_policies)

Layer stacks are scanned unless --unroll (XLA's cost model counts a loop body once, so a
scanned step's FLOPs are one layer's plus the rest). Attention dropout is 0 in every variant (the fused kernels have none), so variants compare
like with like. Per device, XLA reports the bytes of the arguments (parameters, optimizer state,
batch), temporaries and the peak, FLOPs per step by its cost model (blind to the inside of a
Pallas kernel: splash attention's FLOPs are missing from its count) and the number of Mosaic
kernel calls in the program (proof that splash attention is the kernel, not a fallback).

  PYTHONPATH=/path/to/libtpu .venv/bin/python scripts/compile_accelerator_paths.py \\
      --models bert_base,modern_decoder_small --topology v5e:2x2 --batch_size 32 --seq_len 512

GPU targets are not compiled: XLA's GPU compiler needs a visible CUDA device (it autotunes
against it), which these machines do not have.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import json
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import logging as absl_logging

import benchmark_train_step as bts
from benchmark_compile import machine_line
from pretrain_jax.config import bound, configure
from pretrain_jax.data import pipeline
from pretrain_jax.training import aot, partitioning, trainer

absl_logging.set_verbosity(absl_logging.ERROR)
REMAT = ("dots_saveable", "nothing_saveable")


def variants() -> list[tuple[str, str, tuple[str, ...]]]:
  """(name, compute dtype, gin bindings; '{cfg}' is the model's config class)."""
  out = [("base (bf16)", "bfloat16", ()), ("fp32", "float32", ()),
         ("attention=xla", "bfloat16", ("dot_product_attention.implementation = 'xla'",)),
         ("attention=splash", "bfloat16",
          ("dot_product_attention.implementation = 'splash'",))]
  out += [(f"remat={p}", "bfloat16", (f"{{cfg}}.remat_policy = '{p}'",)) for p in REMAT]
  return out


def compile_one(model: str, dtype: str, bindings, devices, batch_size: int, seq_len: int,
                unroll: bool, extra=()):
  bts.configure_model(model, dtype, seq_len)
  cfg = "BertConfig" if bts.model_name(model).startswith("bert_") else "GptConfig"
  no_attention_dropout = (f"{cfg}.attention_dropout_rate = 0.0" if cfg == "BertConfig"
                          else f"{cfg}.dropout_rate = 0.0")
  configure([], [no_attention_dropout, f"{cfg}.scan_unroll = {unroll}",
                 *(b.format(cfg=cfg) for b in (*bindings, *extra))])
  mesh = partitioning.make_mesh(data=-1, devices=devices)
  setup = trainer.Setup(bound("train.model"), bound("train.loss_fn"), num_steps=1000, mesh=mesh)
  batch = pipeline.batch_spec(
      bound("train.task"), pipeline.feature_lengths(seq_len), bound("train.feature_converter"),
      batch_size, sharding_of=lambda ndim: partitioning.batch_sharding(mesh, ndim))
  t0 = time.perf_counter()
  result = aot.report(setup.compile_step(batch))
  result["compile_s"] = time.perf_counter() - t0
  result["flops_per_token_formula"] = setup.flops_per_token(seq_len)
  return result


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="bert_base,modern_decoder_small")
  p.add_argument("--topology", default="v5e:2x2")
  p.add_argument("--batch_size", type=int, default=32, help="global")
  p.add_argument("--seq_len", type=int, default=512)
  p.add_argument("--variants", default="", help="comma list of variant names (default: all)")
  p.add_argument("--unroll", action="store_true",
                 help="unroll the layer stacks: XLA's cost model counts a scanned stack's "
                      "body once, so only unrolled FLOPs are the step's (slower compiles)")
  p.add_argument("--bindings", default="", help="gin bindings for every variant, ';'-separated "
                 "('{cfg}' is the model's config class, e.g. '{cfg}.num_layers = 2')")
  p.add_argument("--output", help="also write the results as JSON here")
  args = p.parse_args()
  chosen = [v for v in variants() if not args.variants or v[0] in args.variants.split(",")]
  devices = aot.topology_devices(args.topology)
  print(f"# {machine_line()}; compiling for {args.topology}: {len(devices)} x "
        f"{devices[0].device_kind}, data-parallel, batch {args.batch_size} x {args.seq_len}",
        file=sys.stderr, flush=True)
  rows = []
  for model in args.models.split(","):
    for name, dtype, bindings in chosen:
      try:
        r = compile_one(model, dtype, bindings, devices, args.batch_size, args.seq_len,
                        args.unroll, [b for b in args.bindings.split(";") if b.strip()])
      except Exception as e:  # one variant that does not compile is a result, not the end
        r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
      rows.append({"model": model, "variant": name, **r})
      print(f"# {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
  tokens = args.batch_size * args.seq_len / len(devices)
  print(f"\n{args.topology} ({len(devices)} x {devices[0].device_kind}), global batch "
        f"{args.batch_size} x {args.seq_len}, layers {'unrolled' if args.unroll else 'scanned'}"
        ", per device:\n")
  print("| model | variant | arguments (MiB) | temporaries (MiB) | peak (MiB) | XLA GFLOP "
        "| XLA / formula | Mosaic kernels | compile (s) |\n|---|---|---:|---:|---:|---:|---:|---:|---:|")
  mib = 2 ** 20
  for r in rows:
    if "error" in r:
      print(f"| {r['model']} | {r['variant']} | {r['error']} |||||||")
      continue
    formula = r["flops_per_token_formula"] * tokens
    print(f"| {r['model']} | {r['variant']} | {r['argument_bytes'] / mib:,.0f} "
          f"| {r['temp_bytes'] / mib:,.0f} | {r['peak_bytes'] / mib:,.0f} "
          f"| {r['flops'] / 1e9:,.0f} | {r['flops'] / formula:.2f} | {r['kernels']} "
          f"| {r['compile_s']:.0f} |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"argv": sys.argv[1:], "machine": machine_line(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
