"""In-context learning (Brown et al. 2020): k solved examples in the prompt, then the query.

Each example of a SeqIO text-to-text task is rendered with a template such as GPT-3's
`{inputs} -> {targets}` (its `thanks -> merci`), examples joined by a separator:

    sea otter -> loutre de mer
    cheese -> fromage
    thanks ->                 ← the model continues from here

Classification scores every label's continuation by its log-likelihood and picks the best;
generation decodes greedily up to the separator and counts exact matches.
"""

from __future__ import annotations

import collections
import dataclasses
import random

import numpy as np
import seqio

from pretrain_jax.errors import UserError
from pretrain_jax.inference import decoding

BOS_ID = 0  # SeqIO's decoder converter opens every training document with id 0


@dataclasses.dataclass(frozen=True)
class Template:
  text: str = "{inputs} -> {targets}"
  separator: str = "\n"
  max_input_words: int | None = 24  # long inputs (articles) are cut so k shots fit the context

  def __post_init__(self):
    if self.text.count("{targets}") != 1 or "{inputs}" not in self.text:
      raise UserError(f"template {self.text!r} needs one {{inputs}} and one {{targets}}")
    if not self.text.rstrip().endswith("{targets}"):
      raise UserError(f"template {self.text!r} must end with {{targets}}: the model continues "
                      "from the text before it")

  def _inputs(self, text: str) -> str:
    words = text.split()
    return " ".join(words[:self.max_input_words] if self.max_input_words else words)

  def solved(self, inputs: str, targets: str) -> str:
    return self.text.format(inputs=self._inputs(inputs), targets=targets)

  def query(self, inputs: str) -> tuple[str, str]:
    """(context up to the answer, the whitespace that precedes the answer)."""
    head = self.text[:self.text.index("{targets}")].format(inputs=self._inputs(inputs))
    stripped = head.rstrip()
    return stripped, head[len(stripped):]

  def prompt(self, shots: list[tuple[str, str]], inputs: str) -> tuple[str, str]:
    context, space = self.query(inputs)
    return self.separator.join([self.solved(i, t) for i, t in shots] + [context]), space


def check_task_split(task: str, split: str, shots_split: str = "train") -> None:
  """UserError unless `task` is registered and has `split` (the queries) and `shots_split`
  (the solved examples), naming the splits it has."""
  if task not in seqio.TaskRegistry.names() and task not in seqio.MixtureRegistry.names():
    raise UserError(f"unknown task {task!r} (see show-data --list)")
  splits = list(seqio.get_mixture_or_task(task).splits)
  for flag, name in (("--split", split), ("shots_split", shots_split)):
    if name not in splits:
      raise UserError(f"{flag}={name!r}: task {task!r} has no such split; its splits: "
                      f"{', '.join(splits)}")


def task_examples(task: str, split: str) -> list[tuple[str, str]]:
  """(inputs, targets) texts of a SeqIO text-to-text task, before tokenization."""
  check_task_split(task, split, split)
  provider = seqio.get_mixture_or_task(task)
  if not {"inputs", "targets"} <= set(provider.output_features):
    raise UserError(f"task {task!r} has features {sorted(provider.output_features)}; in-context "
                    "learning needs a text-to-text task (inputs and targets)")
  # Lengths only bound the (unused) tokenized features; the texts are read before tokenizing.
  ds = provider.get_dataset({"inputs": 2048, "targets": 2048}, split=split, shuffle=False)
  examples = []
  for ex in ds.as_numpy_iterator():
    if "inputs_pretokenized" not in ex or "targets_pretokenized" not in ex:
      raise UserError(f"task {task!r} has no inputs/targets text (inputs_pretokenized and "
                      "targets_pretokenized): in-context learning needs a text-to-text task")
    examples.append((ex["inputs_pretokenized"].decode(), ex["targets_pretokenized"].decode()))
  if not examples:
    raise UserError(f"task {task!r} split {split!r} is empty")
  return examples


def _encode(vocabulary, context: str, continuation: str) -> tuple[list[int], list[int]]:
  """Token ids of the context (after BOS) and of the continuation as they would be tokenized
  together, so "->" + " business" scores the tokens the model would read."""
  context_ids = [BOS_ID] + list(vocabulary.encode(context))
  whole = [BOS_ID] + list(vocabulary.encode(context + continuation))
  if whole[:len(context_ids)] == context_ids and len(whole) > len(context_ids):
    return context_ids, whole[len(context_ids):]
  return context_ids, list(vocabulary.encode(continuation))


def _label_scores(model, vocabulary, prompts, spaces, labels) -> np.ndarray:
  """[queries, labels] log p(label | prompt)."""
  contexts, continuations = [], []
  for prompt, space in zip(prompts, spaces):
    for label in labels:
      c, t = _encode(vocabulary, prompt, space + label)
      contexts.append(c)
      continuations.append(t)
  return decoding.score(model, contexts, continuations).reshape(len(prompts), len(labels))


def evaluate(model, vocabulary, task: str, *, shots: int = 4, split: str = "validation",
             shots_split: str = "train", mode: str = "classify",
             template: Template = Template(), num_examples: int | None = None,
             max_new_tokens: int = 8, seed: int = 0, max_context: int | None = None,
             calibrate: bool = False) -> dict:
  """k-shot accuracy of `model` on `task` (classification by likelihood, or exact match).

  `calibrate`: contextual calibration (Zhao et al. 2021): each label's log-likelihood is
  offset by its log-probability (among the labels) for the same shots with a content-free
  query ("N/A"), which removes the prompt's bias toward some labels.
  """
  if mode not in ("classify", "generate"):
    raise UserError(f"mode={mode!r}; valid: 'classify', 'generate'")
  if shots < 0:
    raise UserError(f"shots={shots}; it must be >= 0")
  if num_examples is not None and num_examples < 1:
    raise UserError(f"num_examples={num_examples}; it must be >= 1 (or all)")
  pool = task_examples(task, shots_split)
  queries = task_examples(task, split)[:num_examples]
  labels = sorted({t for _, t in pool})
  max_context = max_context or getattr(getattr(model, "cfg", None), "max_positions", 1024)
  rng = random.Random(seed)
  answer_tokens = (max(len(vocabulary.encode(" " + label)) for label in labels) + 1
                   if mode == "classify" else max_new_tokens)
  prompts, spaces, content_free = [], [], []
  for inputs, _ in queries:
    chosen = rng.sample(pool, min(shots, len(pool)))
    while True:  # drop the earliest shots until the prompt leaves room for the answer
      prompt, space = template.prompt(chosen, inputs)
      length = 1 + len(vocabulary.encode(prompt)) + answer_tokens
      if length <= max_context or not chosen:
        break
      chosen = chosen[1:]
    if length > max_context:
      raise UserError(f"even the zero-shot prompt needs {length} tokens, more than the model's "
                      f"context {max_context}; lower Template.max_input_words")
    prompts.append(prompt)
    spaces.append(space)
    if calibrate:
      content_free.append(template.prompt(chosen, "N/A")[0])
  gold = [t for _, t in queries]
  if mode == "classify":
    scores = _label_scores(model, vocabulary, prompts, spaces, labels)
    if calibrate:
      bias = _label_scores(model, vocabulary, content_free, spaces, labels)
      scores = scores - (bias - np.logaddexp.reduce(bias, axis=1, keepdims=True))
    predictions = [labels[i] for i in scores.argmax(axis=1)]
  else:
    outputs = decoding.generate(model, [[BOS_ID] + list(vocabulary.encode(p)) for p in prompts],
                                max_new_tokens, eos_id=vocabulary.eos_id)
    predictions = []
    for out, target in zip(outputs, gold):
      text = vocabulary.decode(out)
      if template.separator.strip() and template.separator in text:
        text = text.split(template.separator)[0]
      else:  # a whitespace separator may not survive tokenization: compare as many words
        text = " ".join(text.split()[:len(target.split())])
      predictions.append(text.strip())
  correct = [p.strip() == g.strip() for p, g in zip(predictions, gold)]
  majority = collections.Counter(gold).most_common(1)[0][1] / len(gold)
  return {"task": task, "split": split, "mode": mode, "shots": shots, "calibrated": calibrate,
          "examples": len(gold),
          "accuracy": float(np.mean(correct)), "majority_baseline": majority,
          "chance": 1 / len(labels) if mode == "classify" else None,
          "predicted": dict(collections.Counter(predictions).most_common(8)),
          "predictions": predictions,
          "first_prompt": prompts[0]}
