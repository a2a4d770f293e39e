"""The `generate` and `icl` verbs: a trained model_dir in, text or accuracy out."""

from __future__ import annotations

import json
import os

from pretrain_jax.errors import UserError
from pretrain_jax.inference import beam_search, decoding, in_context, loading
from pretrain_jax.inference.sampling import Sampling
from pretrain_jax.models import protocol


def _prompts(prompts: list[str], prompt_file: str | None) -> list[str]:
  prompts = list(prompts)
  if prompt_file:
    if not os.path.exists(prompt_file):
      raise UserError(f"--prompt_file={prompt_file}: no such file")
    if os.path.isdir(prompt_file):
      raise UserError(f"--prompt_file={prompt_file} is a directory; give a text file, one "
                      "prompt a line")
    with open(prompt_file, "rb") as f:
      data = f.read()
    try:
      text = data.decode("utf-8").removeprefix("\ufeff")  # a BOM is no prompt text
    except UnicodeDecodeError as e:
      raise UserError(f"--prompt_file={prompt_file} is not UTF-8 text (byte "
                      f"0x{data[e.start]:02x} at offset {e.start}); save it as UTF-8, one "
                      "prompt a line") from None
    if "\0" in text:
      raise UserError(f"--prompt_file={prompt_file} is not text (a NUL byte at offset "
                      f"{text.index(chr(0))}); give a UTF-8 text file, one prompt a line")
    prompts += [line.rstrip("\r") for line in text.split("\n") if line.strip()]
  if not prompts:
    raise UserError("generate needs --prompt TEXT (repeatable) or --prompt_file FILE")
  return prompts


def generate(model_dir, prompts, prompt_file, max_new_tokens, temperature, top_k, top_p, seed,
             as_json, beam_size: int = 1) -> None:
  """Decoder-only models continue each prompt; encoder-decoders read it as their inputs
  (+ EOS) and write the output from BOS."""
  prompts = _prompts(prompts, prompt_file)
  sampling = Sampling(temperature, top_k, top_p)
  if beam_size < 1 or (beam_size > 1 and temperature):
    raise UserError(f"--beam_size={beam_size} --temperature={temperature}: beam search is "
                    "deterministic; use beam_size >= 1 and temperature 0 with it")
  model, vocabulary, step = loading.load(model_dir)
  if isinstance(model, protocol.EncoderDecoder):  # refuses the table's decoder-only rows
    inputs = [list(vocabulary.encode(p)) + [vocabulary.eos_id] for p in prompts]
    width = max(len(i) for i in inputs)
    model = model.decoding([i + [0] * (width - len(i)) for i in inputs])
    ids = [[in_context.BOS_ID] for _ in prompts]
  elif not isinstance(model, protocol.Decoder):
    raise UserError(f"generate: {type(model).__name__} has no incremental decoding; use a "
                    "GPT decoder or a T5 encoder-decoder")
  else:
    ids = [[in_context.BOS_ID] + list(vocabulary.encode(p)) for p in prompts]
  if beam_size > 1:
    outputs = beam_search.beam_search(model, ids, max_new_tokens, beam_size=beam_size,
                                      eos_id=vocabulary.eos_id)
  else:
    outputs = decoding.generate(model, ids, max_new_tokens, sampling=sampling,
                                eos_id=vocabulary.eos_id, seed=seed)
  for prompt, out in zip(prompts, outputs):
    text = vocabulary.decode(out)
    if as_json:
      print(json.dumps({"prompt": prompt, "continuation": text, "tokens": out, "step": step}))
    else:
      print(f"{prompt} ▸ {text}")


def icl(model_dir, task, split, shots, mode, template, separator, max_input_words, num, seed,
        as_json, calibrate=False) -> None:
  if not task:
    raise UserError("icl needs --task NAME (a text-to-text task, e.g. bbc_topic)")
  in_context.check_task_split(task, split)  # before the checkpoint is read
  model, vocabulary, step = loading.load(model_dir)
  if not isinstance(model, protocol.Decoder) or isinstance(model, protocol.EncoderDecoder):
    raise UserError("icl needs a decoder-only language model (a GPT config); "
                    f"{type(model).__name__} reads inputs and targets separately")
  result = in_context.evaluate(
      model, vocabulary, task, shots=shots, split=split, mode=mode, num_examples=num, seed=seed,
      template=in_context.Template(template, separator, max_input_words or None),
      calibrate=calibrate)
  result["step"] = step
  if as_json:
    result.pop("first_prompt")
    print(json.dumps(result))
    return
  print(f"{shots}-shot {mode}{' (calibrated)' if calibrate else ''} on {task}/{split} ({result['examples']} examples, step {step}): "
        f"accuracy {result['accuracy']:.3f}  (majority class {result['majority_baseline']:.3f}"
        + (f", chance {result['chance']:.3f})" if result["chance"] else ")"))
  print(f"predictions: {result['predicted']}")
  print("first prompt:\n" + result["first_prompt"])
