"""Benchmark: our train step against Hugging Face transformers' at identical shapes, one run.

Five presets (batch 32 x 128 unless --batch_size, fp32, random init;
`benchmark_train_step.PEER_SHAPES` has our side's configs), each trained by our real train step
(`benchmark_train_step.py`'s `Bench`: gin configs, trainer.Setup, AdamW + clipping) and by the
transformers model of the same shape and parameter count (AdamW, clip 1.0; eager and
`torch.compile`):

  hf_bert_mini    BERT MLM + NSP: 4 L, 256, 4 heads, FF 1024, vocab 30522, dropout 0.1
  hf_gpt2         GPT-2-shaped: 4 L, 256, 4 heads, FF 1024, vocab 50257, dropout 0.1, tied
  hf_llama        Llama-shaped: RMSNorm, RoPE, SwiGLU, untied; 4 L, 256, 4 heads, FF 1024,
                  vocab 32000, no dropout
  hf_t5           T5 v1.0: 4 + 4 L, 256, 4 heads of 64, FF 1024 ReLU, vocab 32128,
                  128 in + 32 out, dropout 0.1, tied
  hf_deepseek_v3  DeepSeek-V3-shaped (`DeepseekV3ForCausalLM`): 2 L of MLA (4 heads, q rank
                  128, kv rank 64, qk 32 + 16 RoPE, v 32), the first with a SwiGLU FF 1024,
                  the second MoE (8 routed experts top-2 + 1 shared, FF 256; sigmoid router,
                  normalised gates, no groups, fixed zero bias); 256, vocab 32000, untied, no
                  MTP; ours dropless, theirs torch's grouped_mm (eager; an expert loop under
                  compile, fp32)

Rounds are interleaved over every (preset, implementation), so load from other processes hits
all alike; the ratios are medians of per-round ratios. The script also measures the machine's
fp32 matmul peak (a 2048^3 matmul in XLA and in torch) and reports our model FLOPs/s (the
model's own FLOP formula x tokens/s) as a share of XLA's, with the compiled step's
`cost_analysis()` FLOPs beside the formula.

  .venv/bin/pip install -e '.[hf]'
  .venv/bin/python scripts/benchmark_vs_hf.py --presets hf_bert_mini,hf_gpt2,hf_llama,hf_t5 \\
      --peers eager,compile --output /tmp/vs_hf.json
  .venv/bin/python scripts/benchmark_vs_hf.py --presets hf_deepseek_v3 --batch_size 16 \\
      --peers eager,compile --output /tmp/vs_hf_deepseek.json
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import argparse
import datetime
import json
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark_train_step as bts  # noqa: E402  (same directory)
from benchmark_compile import machine_line  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def _bert():
  import transformers
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=256, num_hidden_layers=4,
                                num_attention_heads=4, intermediate_size=1024)
  return transformers.BertForPreTraining(cfg), "mlm_nsp"


def _gpt2():
  import transformers
  cfg = transformers.GPT2Config(vocab_size=50257, n_positions=128, n_embd=256, n_layer=4,
                                n_head=4, n_inner=1024, activation_function="gelu_new")
  return transformers.GPT2LMHeadModel(cfg), "causal"


def _llama():
  import transformers
  cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=1024,
                                 num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=4, max_position_embeddings=128,
                                 tie_word_embeddings=False, rms_norm_eps=1e-6,
                                 attention_dropout=0.0)
  return transformers.LlamaForCausalLM(cfg), "causal"


def _t5():
  import transformers
  cfg = transformers.T5Config(vocab_size=32128, d_model=256, d_kv=64, d_ff=1024, num_layers=4,
                              num_decoder_layers=4, num_heads=4, feed_forward_proj="relu",
                              dropout_rate=0.1, tie_word_embeddings=True,
                              decoder_start_token_id=0, pad_token_id=0)
  return transformers.T5ForConditionalGeneration(cfg), "seq2seq"


def _deepseek_v3():
  import transformers
  cfg = transformers.DeepseekV3Config(
      vocab_size=32000, hidden_size=256, intermediate_size=1024, moe_intermediate_size=256,
      num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=4,
      num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
      n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.0, q_lora_rank=128,
      kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
      max_position_embeddings=128, rope_interleave=False,  # ours pairs halves, as Llama
      tie_word_embeddings=False, rms_norm_eps=1e-6, num_mtp_layers=0)
  return transformers.DeepseekV3ForCausalLM(cfg), "causal"


PEERS = {"hf_bert_mini": _bert, "hf_gpt2": _gpt2, "hf_llama": _llama, "hf_t5": _t5,
         "hf_deepseek_v3": _deepseek_v3}


def xla_matmul_gflops(n: int = 2048, reps: int = 10) -> float:
  a = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)), jnp.float32)
  f = jax.jit(lambda x, y: x @ y)
  f(a, a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    out = f(a, a)
  out.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


def torch_matmul_gflops(n: int = 2048, reps: int = 10) -> float:
  import torch
  a = torch.randn(n, n)
  a @ a
  t0 = time.perf_counter()
  for _ in range(reps):
    a @ a
  return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9


class Ours:
  def __init__(self, name: str, args):
    self.bench = bts.Bench(name, "float32", args.batch_size, args.seq_len, args.warmup)
    self.result = {**self.bench.result, "preset": name, "impl": "ours",
                   "compiled_flops_per_token": self.bench.compiled_flops() / self.bench.tokens_per_step}
    self.tokens_per_step = self.bench.tokens_per_step

  def run(self, steps: int) -> float:
    return self.bench.run(steps)


class Peer:
  """A transformers model trained the way our step trains: AdamW (wd 0.01), clip 1.0."""

  def __init__(self, name: str, compiled: bool, args):
    import torch
    torch.manual_seed(0)
    self.model, kind = PEERS[name]()
    self.model.train()
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.01)
    b, n, vocab = args.batch_size, args.seq_len, self.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, n), generator=g)
    if kind == "mlm_nsp":
      labels = torch.where(torch.rand(b, n, generator=g) < 0.15, ids, -100)
      self.batch = dict(input_ids=ids, token_type_ids=(torch.arange(n) >= n // 2).long().expand(b, n),
                        labels=labels, next_sentence_label=torch.randint(0, 2, (b,), generator=g))
      self.tokens_per_step = b * n
    elif kind == "causal":
      self.batch = dict(input_ids=ids, labels=ids)
      self.tokens_per_step = b * n
    else:  # encoder inputs of n, targets of n / 4
      self.batch = dict(input_ids=ids,
                        labels=torch.randint(0, vocab, (b, n // 4), generator=g))
      self.tokens_per_step = b * (n + n // 4)
    self.forward = torch.compile(self.model) if compiled else self.model
    self.result = {"preset": name, "impl": "hf_compile" if compiled else "hf_eager",
                   "params": sum(p.numel() for p in self.model.parameters()),
                   "step_s_repeats": []}
    t0 = time.perf_counter()
    self.run(1)
    self.result["first_step_s"] = time.perf_counter() - t0
    self.run(args.warmup)

  def step(self):
    import torch
    loss = self.forward(**self.batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss

  def run(self, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      self.step().item()  # torch runs eagerly anyway; .item() only syncs
    return (time.perf_counter() - t0) / max(steps, 1)


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--presets", default=",".join(PEERS))
  p.add_argument("--peers", default="eager,compile", help="of eager, compile")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--steps", type=int, default=5, help="timed steps per round")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--output")
  args = p.parse_args()
  import torch
  import transformers
  torch.set_num_threads(os.cpu_count())
  started, load0 = datetime.datetime.now().isoformat(timespec="seconds"), os.getloadavg()[0]
  peak = {"xla": xla_matmul_gflops(), "torch": torch_matmul_gflops()}
  print(f"# 2048^3 fp32 matmul: XLA {peak['xla']:.0f} GFLOP/s, torch {peak['torch']:.0f}",
        file=sys.stderr, flush=True)
  benches = []
  for name in args.presets.split(","):
    benches.append(Ours(name, args))
    for peer in args.peers.split(","):
      benches.append(Peer(name, peer == "compile", args))
    for b in benches[-1 - len(args.peers.split(",")):]:
      print(f"# set up {name} {b.result['impl']}: {b.result['params']:,} params, first step "
            f"{b.result['first_step_s']:.1f} s", file=sys.stderr, flush=True)
  for r in range(args.rounds):
    for b in benches:
      b.result["step_s_repeats"].append(b.run(args.steps))
    print(f"# round {r + 1}: " + ", ".join(
        f"{b.result['preset']} {b.result['impl']} {b.tokens_per_step / b.result['step_s_repeats'][-1]:.0f}"
        for b in benches), file=sys.stderr, flush=True)
  rows = []
  for name in args.presets.split(","):
    group = {b.result["impl"]: b for b in benches if b.result["preset"] == name}
    ours = group["ours"]
    tps = {impl: b.tokens_per_step / statistics.median(b.result["step_s_repeats"])
           for impl, b in group.items()}
    peers = [impl for impl in group if impl != "ours"]
    best = max(peers, key=lambda i: tps[i]) if peers else None
    ratio = best and statistics.median(  # per round, against that round's better peer
        min(group[i].result["step_s_repeats"][k] / group[i].tokens_per_step for i in peers)
        / (ours.result["step_s_repeats"][k] / ours.tokens_per_step) for k in range(args.rounds))
    flops = ours.result["flops_per_token"] * tps["ours"] / 1e9
    rows.append(dict(preset=name, tokens_per_s=tps, ours_over_best_peer=ratio, best_peer=best,
                     model_gflops_per_s=flops, share_of_xla_peak=flops / peak["xla"],
                     flops_per_token=ours.result["flops_per_token"],
                     compiled_flops_per_token=ours.result["compiled_flops_per_token"],
                     params={i: b.result["params"] for i, b in group.items()},
                     first_step_s={i: b.result["first_step_s"] for i, b in group.items()}))
  print(f"\n{machine_line()}; {started}; jax {jax.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}; batch {args.batch_size} x {args.seq_len}, "
        f"fp32, {args.rounds} rounds x {args.steps} steps; load average {load0:.1f} -> "
        f"{os.getloadavg()[0]:.1f}; 2048^3 matmul XLA {peak['xla']:.0f} GFLOP/s, torch "
        f"{peak['torch']:.0f}\n")
  impls = ["hf_eager", "hf_compile"]
  print("| preset | " + " | ".join(f"{i} tokens/s" for i in impls) + " | ours tokens/s | ours / "
        "best peer | model GFLOP/s | share of XLA peak | FLOPs/token formula / compiled |")
  print("|---|" + "---:|" * (len(impls) + 5))
  for r in rows:
    print(f"| {r['preset']} | " + " | ".join(
        f"{r['tokens_per_s'][i]:,.0f}" if i in r["tokens_per_s"] else "-" for i in impls)
        + f" | {r['tokens_per_s']['ours']:,.0f} | "
        + (f"{r['ours_over_best_peer']:.2f}" if r["ours_over_best_peer"] else "-")
        + f" | {r['model_gflops_per_s']:.1f} | {r['share_of_xla_peak']:.0%} | "
        f"{r['flops_per_token'] / 1e6:.1f}M / {r['compiled_flops_per_token'] / 1e6:.1f}M |")
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"machine": machine_line(), "started": started, "peak_gflops": peak,
                 "rows": rows, "results": [b.result for b in benches]}, f, indent=2)


if __name__ == "__main__":
  main()
