"""Command line: python -m pretrain_jax VERB --gin_file=F [--gin.NAME=VALUE ...] [flags].

Verbs: train, eval, show-data, generate, icl, info, aot (the train step compiled for a TPU
topology without one: memory per chip, FLOPs, predicted step and recipe time), export (a prefix-tuned run with its
prefixes stored plain, into --out_dir), import-bert (a local Hugging Face BERT directory as a
run directory --out_dir, for train.init_from). Bad input ends in one line on stderr and
exit status 2. eval, generate and icl read MODEL_DIR/config.gin when no --gin_file is given.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")  # TensorFlow only feeds data here

VERBS = ("train", "eval", "show-data", "generate", "icl", "info", "aot", "export",
         "import-bert")


def _parse(argv):
  parser = argparse.ArgumentParser(prog="pretrain-jax", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("verb", choices=VERBS)
  parser.add_argument("--gin_file", action="append", default=[],
                      help="gin file (repeatable); relative paths also resolve in gin_configs/")
  parser.add_argument("--model_dir", help="checkpoints, metrics.jsonl, TensorBoard, config.gin")
  parser.add_argument("--out_dir", help="export, import-bert: the new run directory")
  parser.add_argument("--hf_dir", help="import-bert: config.json, model.safetensors, vocab.txt")
  parser.add_argument("--task", help="show-data: task or mixture name")
  parser.add_argument("--split", help="show-data: default train; eval: default validation")
  parser.add_argument("--num", type=int, default=None,
                      help="show-data: examples to print (3); icl: examples to evaluate (all)")
  parser.add_argument("--sequence_length", type=int, default=None,
                      help="show-data: length (default: train.sequence_length or 128)")
  parser.add_argument("--json", action="store_true",
                      help="show-data: one JSON object a line; info, aot: one JSON object")
  parser.add_argument("--list", action="store_true", help="show-data: list tasks and mixtures")
  parser.add_argument("--topology", help="aot: TPU topology, e.g. v5e:8x8, v4:4x4x4, v3:8x8")
  parser.add_argument("--mesh", help="the mesh gin_configs/meshes/NAME.gin (e.g. fsdp, "
                      "data_parallel), after every --gin_file")
  parser.add_argument("--no_progress", action="store_true", help="train: no progress bar")
  gen = parser.add_argument_group("generate")
  gen.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
  gen.add_argument("--prompt_file", help="one prompt per line")
  gen.add_argument("--max_new_tokens", type=int, default=40)
  gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
  gen.add_argument("--top_k", type=int, default=0, help="0: no top-k filter")
  gen.add_argument("--top_p", type=float, default=1.0, help="1.0: no nucleus filter")
  gen.add_argument("--seed", type=int, default=0)
  gen.add_argument("--beam_size", type=int, default=1, help="> 1: beam search (length penalty 0.6)")
  icl = parser.add_argument_group("icl (in-context learning; --task, --split, --num, --json too)")
  icl.add_argument("--shots", type=int, default=4)
  icl.add_argument("--mode", choices=("classify", "generate"), default="classify")
  icl.add_argument("--template", default="{inputs} -> {targets}")
  icl.add_argument("--separator", default="\n")
  icl.add_argument("--max_input_words", type=int, default=24)
  icl.add_argument("--calibrate", action="store_true",
                   help="contextual calibration against a content-free query (Zhao et al. 2021)")
  parser.add_argument("--coordinator_address", help="multi-host: host:port of process 0 "
                      "(jax.distributed; TPU pods and SLURM can omit it with --multi_host)")
  parser.add_argument("--num_processes", type=int)
  parser.add_argument("--process_id", type=int)
  parser.add_argument("--multi_host", action="store_true",
                      help="call jax.distributed.initialize() (auto-detected cluster)")
  args, rest = parser.parse_known_args(argv)
  bindings = []
  for arg in rest:
    if arg.startswith("--gin.") and "=" in arg:
      bindings.append(arg[len("--gin."):])
    else:
      parser.error(f"unrecognized argument {arg!r} (gin bindings are --gin.NAME=VALUE)")
  return args, bindings


def _import_tensorflow_quietly() -> None:
  """TensorFlow's C++ runtime prints start-up notices (twice) before any log level applies."""
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def main(argv=None) -> int:
  args, bindings = _parse(sys.argv[1:] if argv is None else argv)
  _import_tensorflow_quietly()
  from pretrain_jax.errors import UserError
  try:
    for flag in ("num", "sequence_length"):
      if getattr(args, flag) is not None and getattr(args, flag) < 1:
        raise UserError(f"--{flag}={getattr(args, flag)}; it must be a positive integer")
    if args.multi_host or args.coordinator_address:
      import jax
      try:
        jax.distributed.initialize(args.coordinator_address, args.num_processes,
                                   args.process_id)
      except Exception as e:  # pylint: disable=broad-except
        raise UserError(f"jax.distributed.initialize failed (coordinator "
                        f"{args.coordinator_address or 'auto-detected'}, "
                        f"{args.num_processes} processes, this one {args.process_id}): "
                        f"{(str(e).strip().splitlines() or [type(e).__name__])[0]}") from e
    from pretrain_jax import registry  # noqa: F401  (gin configurables and tasks, before parsing)
    from pretrain_jax.config import configure
    gin_files = args.gin_file
    if not gin_files and args.verb in ("eval", "generate", "icl", "export") and args.model_dir:
      saved = os.path.join(args.model_dir, "config.gin")
      if not os.path.exists(saved):
        raise UserError(f"{args.verb}: no --gin_file and no {saved}")
      gin_files = [saved]
    if args.mesh:
      gin_files = [*gin_files, f"meshes/{args.mesh}.gin"]
    configure(gin_files, bindings)
    if args.verb == "train":
      from pretrain_jax.training import trainer
      if not args.model_dir:
        raise UserError("train needs --model_dir")
      trainer.train(args.model_dir, progress=not args.no_progress)
    elif args.verb == "eval":
      from pretrain_jax.training import trainer
      if not args.model_dir:
        raise UserError("eval needs --model_dir (a directory holding checkpoints)")
      import json
      from pretrain_jax.inference import classify
      result = trainer.evaluate_checkpoint(args.model_dir, args.split or "validation")
      if classify.is_classifier_run():  # the task's metrics over the whole split too
        result["task_metrics"] = classify.evaluate(args.model_dir, args.split or "validation")
      print(json.dumps(result))
    elif args.verb == "export":
      if not (args.model_dir and args.out_dir):
        raise UserError("export needs --model_dir (a prefix-tuned run) and --out_dir")
      import json
      from pretrain_jax.peft import export
      print(json.dumps(export.export(args.model_dir, args.out_dir)))
    elif args.verb == "import-bert":
      if not (args.hf_dir and args.out_dir):
        raise UserError("import-bert needs --hf_dir (a Hugging Face BERT directory) and --out_dir")
      import json
      from pretrain_jax.models import bert_import
      print(json.dumps(bert_import.import_bert(args.hf_dir, args.out_dir)))
    elif args.verb == "aot":
      from pretrain_jax.training import aot
      aot.main(args.topology, as_json=args.json)
    elif args.verb == "info":
      from pretrain_jax.training import info
      info.main(as_json=args.json)
    elif args.verb == "show-data":
      from pretrain_jax.data import show
      show.main(task=args.task, split=args.split or "train",
                num=3 if args.num is None else args.num,
                as_json=args.json, list_tasks=args.list, sequence_length=args.sequence_length)
    elif args.verb in ("generate", "icl"):
      if not args.model_dir:
        raise UserError(f"{args.verb} needs --model_dir (a trained run)")
      from pretrain_jax.inference import cli
      if args.verb == "generate":
        cli.generate(args.model_dir, args.prompt, args.prompt_file, args.max_new_tokens,
                     args.temperature, args.top_k, args.top_p, args.seed, args.json,
                     args.beam_size)
      else:
        cli.icl(args.model_dir, args.task, args.split or "validation", args.shots, args.mode,
                args.template, args.separator.replace("\\n", "\n").replace("\\t", "\t"),
                args.max_input_words, args.num, args.seed, args.json, args.calibrate)
  except UserError as e:
    print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)  # gin appends a context line
    rc = 2
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    rc = 130
  else:
    rc = 0
  gc.collect()  # free tf.data iterators held by a traceback before interpreter shutdown
  return rc


if __name__ == "__main__":
  sys.exit(main())
