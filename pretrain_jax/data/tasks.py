"""SeqIO task registrations: the bundled BBC News corpus and the user's own text files.

Importing this module registers:
  bbc_bert       BERT: sentence pairs with NSP, 15 % token masking (80/10/10)
  bbc_bert_wwm   BERT with whole-word masking
  bbc_roberta    RoBERTa: FULL-SENTENCES packing, no NSP, dynamic masking
  bbc_spanbert   SpanBERT: FULL-SENTENCES, no NSP, geometric span masking (p = 0.2, max 10)
  bbc_lm         causal LM (GPT): whole documents + EOS, cut into chunks of L, packed
  bbc_topic      text-to-text topic classification: inputs = article, targets = topic word,
                 label = 0..4 (business, entertainment, politics, sport, tech)
  bbc_topic_gpt  bbc_topic in GPT's finetuning format: inputs = [START] article [EXTRACT]
  bbc_span_corruption, bbc_iid_noise, bbc_prefix_lm, bbc_deshuffle
                 the T5 paper's unsupervised objectives (objectives/denoising.py) as
                 text-to-text tasks; bbc_span_corruption_and_prefix_lm mixes two by rate
Masks are drawn per epoch (the trainer passes seed + epoch), so every task masks dynamically.
Users' text: `local_text_task(pattern=..., separator=..., objective=...)`, selected from gin.
Each task is registered with its objective's feature converter (`feature_converter(name)`).
Registering reads no corpus: a source counts its examples when SeqIO first asks.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from typing import Callable

import gin
import seqio
import tensorflow as tf

from pretrain_jax.data import corpora, pipeline, vocabularies
from pretrain_jax.errors import UserError
from pretrain_jax.objectives import causal_lm, classification, denoising, masked_lm

MLM_OBJECTIVES = {
    # name: (segment construction, masking unit)
    "bert": (masked_lm.next_sentence_pairs, "token"),
    "bert_wwm": (masked_lm.next_sentence_pairs, "whole_word"),
    "roberta": (masked_lm.full_sentences, "token"),
    "spanbert": (masked_lm.full_sentences, "span"),
}


# The feature converter of each task's objective, by task name: a factory, as converters keep
# per-call state. T5's objectives pack inputs and targets (objectives/t5_span_corruption.gin).
_CONVERTERS: dict[str, Callable[[], seqio.FeatureConverter]] = {}
_ENC_DEC = functools.partial(seqio.EncDecFeatureConverter, pack=True)


def _add_task(name: str, converter: Callable[[], seqio.FeatureConverter], **kwargs) -> seqio.Task:
  """seqio.TaskRegistry.add, remembering the converter of the task's objective."""
  _CONVERTERS[name] = converter
  return seqio.TaskRegistry.add(name, **kwargs)


def feature_converter(name: str) -> seqio.FeatureConverter:
  """A fresh feature converter of the objective of task or mixture `name`, for when gin binds
  no train.feature_converter (show-data); a mixture's tasks must agree on it."""
  subtasks = seqio.get_subtasks(pipeline.provider(name))
  unknown = [t.name for t in subtasks if t.name not in _CONVERTERS]
  if unknown:
    raise UserError(f"task {unknown[0]!r} was not registered by pretrain_jax.data.tasks, so its "
                    "feature converter is unknown; bind train.feature_converter in a gin file")
  factories = {_CONVERTERS[t.name] for t in subtasks}
  if len(factories) > 1:
    kinds = sorted(getattr(f, "func", f).__name__ for f in factories)
    raise UserError(f"mixture {name!r} mixes tasks of different feature converters "
                    f"({', '.join(kinds)}); bind train.feature_converter in a gin file")
  return factories.pop()()


class _Source(seqio.FunctionDataSource):
  """A FunctionDataSource that counts a split's examples only when SeqIO asks (it caches small
  sources in memory), so registering a task over the bundled corpus reads none of its files."""

  def __init__(self, dataset_fn, splits, count_of_split: Callable[[str], int]):
    super().__init__(dataset_fn, splits=splits)
    self._count_of_split = count_of_split

  def num_input_examples(self, split: str) -> int:
    return self._count_of_split(split)


class PreparedTfdsSource(seqio.TfdsDataSource):
  """A read-only TfdsDataSource: seqio's default calls `tfds.load(download=True,
  try_gcs=True)`, which downloads and prepares a missing dataset the first time a task reads
  it (offline: minutes of retries); this one reads only what is prepared in the data dir
  (`builder.as_dataset`) and says how to prepare what is missing."""

  def __init__(self, tfds_name: str, splits, tfds_data_dir: str | None = None):
    super().__init__(tfds_name, tfds_data_dir=tfds_data_dir, splits=splits, read_only=True)
    self._tfds_name = tfds_name

  def _check_prepared(self) -> None:
    try:
      builder = self.tfds_dataset.builder
      prepared, where = builder.is_prepared(), builder.data_dir_root
    except Exception as e:  # pylint: disable=broad-except  (an unknown name, a bad data dir)
      where = (self.tfds_dataset.data_dir or os.environ.get("TFDS_DATA_DIR")
               or "~/tensorflow_datasets")
      reason = (str(e).strip().splitlines() or [type(e).__name__])[0].rstrip(".")
      raise UserError(f"TFDS dataset {self._tfds_name} cannot be opened in {where}: {reason}; "
                      f"check its name and version (`tfds build {self._tfds_name} "
                      f"--data_dir={where}` prepares one of TFDS's catalog)") from None
    if not prepared:
      raise UserError(f"TFDS dataset {self._tfds_name} is not prepared in {where}: prepare it "
                      f"once with `tfds build {self._tfds_name} --data_dir={where}` (downloads "
                      "it), or set TFDS_DATA_DIR to a folder that holds it")

  def get_dataset(self, *args, **kwargs):
    self._check_prepared()
    return super().get_dataset(*args, **kwargs)

  def num_input_examples(self, split: str):
    self._check_prepared()
    return super().num_input_examples(split)

  def list_shards(self, split: str):
    self._check_prepared()
    return super().list_shards(split)


def _records_source(records_of_split, count_of_split) -> seqio.DataSource:
  """A SeqIO source of in-memory records (a dict of equal-length lists per split), shuffled
  per seed when the trainer asks."""
  def dataset_fn(split, shuffle_files, seed=None):
    records = records_of_split(split)
    ds = tf.data.Dataset.from_tensor_slices(records)
    if shuffle_files:  # documents of one topic sit together: shuffle them all, not a window
      size = len(next(iter(records.values())))
      ds = ds.shuffle(max(size, 1), seed=seed, reshuffle_each_iteration=False)
    return ds
  return _Source(dataset_fn, corpora.SPLITS, count_of_split)


def _texts_source(texts_of_split, count_of_split) -> seqio.DataSource:
  """A SeqIO source of {"text"} documents."""
  return _records_source(lambda split: {"text": tf.constant(texts_of_split(split), tf.string)},
                         count_of_split)


def _mlm_task(name: str, source: seqio.DataSource, objective: str, vocabulary) -> seqio.Task:
  make_segments, unit = MLM_OBJECTIVES[objective]
  feature = seqio.Feature(vocabulary, add_eos=False, required=False)
  return _add_task(
      name, masked_lm.MaskedLmFeatureConverter, source=source,
      preprocessors=[masked_lm.tokenize_sentences, make_segments,
                     functools.partial(masked_lm.mask_tokens, unit=unit)],
      output_features={"inputs": feature, "targets": feature})


def _bbc_texts(split):
  return [a["text"] for a in corpora.bbc_articles(split)]


def _lm_task(name: str, source: seqio.DataSource, vocabulary, text_key: str = "text"):
  """Whole documents + EOS, cut into chunks of the sequence length (packed by the converter)."""
  return _add_task(
      name, causal_lm.CausalLmFeatureConverter, source=source,
      preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
                     seqio.preprocessors.tokenize, seqio.preprocessors.append_eos,
                     causal_lm.split_to_length],
      output_features={"targets": seqio.Feature(vocabulary, add_eos=True)})


def _bbc_topics(split):
  articles = corpora.bbc_articles(split)
  return {"inputs": tf.constant([" ".join(a["text"].split()) for a in articles], tf.string),
          "targets": tf.constant([a["topic"] for a in articles], tf.string),
          "label": tf.constant([a["label"] for a in articles], tf.int32)}


def _topic_task(name: str, source: seqio.DataSource, vocabulary, gpt_format: bool):
  """T5 style: inputs cut to fit and closed by EOS (the decoder-only rows of the T5 table
  need that boundary); GPT style: [START] inputs [EXTRACT] instead."""
  if gpt_format:
    preprocessors = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos,
                     classification.gpt_format]
  else:
    preprocessors = [seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim]
  converter = classification.ClassificationFeatureConverter if gpt_format else _ENC_DEC
  return _add_task(
      name, converter, source=source, preprocessors=preprocessors,
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=not gpt_format),
                       "targets": seqio.Feature(vocabulary, add_eos=True)},
      metric_fns=[])


def _raw_length(objective: str):
  """Raw tokens per example such that the objective's inputs and targets (+ EOS) both fit:
  nothing is cut off silently by the converter's trimming."""
  def length_of(sequence_length):
    inputs, targets = sequence_length["inputs"], sequence_length["targets"]
    if objective == "span_corruption":
      raw, needed = denoising.random_spans_helper(inputs)
      if targets < needed:
        raise UserError(f"span corruption of {inputs} input tokens writes {needed} target "
                        f"tokens; set the targets length (feature_lengths.targets_length) to "
                        f">= {needed}, not {targets}")
      return raw
    if objective == "iid_noise":  # targets ≈ 0.28·L (noise + a sentinel per run): keep margin
      return min(inputs - 1, int((targets - 1) / 0.35))
    return min(inputs, targets) - 1  # prefix_lm (either half may be long), deshuffle
  return length_of


def _denoising_task(name: str, source: seqio.DataSource, objective: str, vocabulary,
                    text_key: str = "text"):
  return _add_task(
      name, _ENC_DEC, source=source,
      preprocessors=[functools.partial(seqio.preprocessors.rekey, key_map={"targets": text_key}),
                     seqio.preprocessors.tokenize,
                     functools.partial(causal_lm.split_to_length,
                                       length_of=_raw_length(objective)),
                     getattr(denoising, objective), seqio.preprocessors.append_eos],
      output_features={"inputs": seqio.Feature(vocabulary, add_eos=True),
                       "targets": seqio.Feature(vocabulary, add_eos=True)})


DENOISING_OBJECTIVES = ("span_corruption", "iid_noise", "prefix_lm", "deshuffle")


@functools.lru_cache(maxsize=None)
def _bbc_count(split):
  return len(corpora.bbc_articles(split))


def register_bbc_tasks() -> None:
  source = _texts_source(_bbc_texts, _bbc_count)
  for objective in MLM_OBJECTIVES:
    if f"bbc_{objective}" not in seqio.TaskRegistry.names():
      _mlm_task(f"bbc_{objective}", source, objective, vocabularies.bbc_wordpiece())
  if "bbc_lm" not in seqio.TaskRegistry.names():
    _lm_task("bbc_lm", source, vocabularies.bbc_sentencepiece())
    topics = _records_source(_bbc_topics, _bbc_count)
    _topic_task("bbc_topic", topics, vocabularies.bbc_sentencepiece(), gpt_format=False)
    _topic_task("bbc_topic_gpt", topics, vocabularies.bbc_sentencepiece(), gpt_format=True)
    for objective in DENOISING_OBJECTIVES:
      _denoising_task(f"bbc_{objective}", source, objective, vocabularies.bbc_sentencepiece())
    seqio.MixtureRegistry.add("bbc_span_corruption_and_prefix_lm",
                              [("bbc_span_corruption", 3.0), ("bbc_prefix_lm", 1.0)])


@gin.configurable
def with_wordpiece(task: str = gin.REQUIRED, vocab_file: str = gin.REQUIRED) -> str:
  """`task` (any WordPiece task here: masked LM, bbc_topic_bert, polarity_bert, glue_*_bert)
  over another WordPiece vocabulary, e.g. an imported checkpoint's vocab.txt (`train.task =
  @with_wordpiece()`). Registers it once, named after the task and the file's content, and
  returns that name; the source, preprocessing and metrics are the task's own."""
  if not os.path.isfile(vocab_file):
    raise UserError(f"with_wordpiece.vocab_file={vocab_file!r}: no such file (a vocab.txt, "
                    "one WordPiece a line)")
  vocabularies.read_wordpiece_tokens(vocab_file, "with_wordpiece.vocab_file=")  # or UserError
  with open(vocab_file, "rb") as f:
    digest = hashlib.sha1(f.read()).hexdigest()[:8]
  name = f"{task}_wp{digest}"
  if name in seqio.TaskRegistry.names():
    return name
  base = seqio.get_mixture_or_task(task)
  if not any(isinstance(f.vocabulary, vocabularies.WordPieceVocabulary)
             for f in base.output_features.values()):
    raise UserError(f"with_wordpiece.task={task!r} has no WordPiece feature "
                    f"(its vocabularies: {[type(f.vocabulary).__name__ for f in base.output_features.values()]})")
  vocabulary = vocabularies.WordPieceVocabulary(vocab_file)
  features = {k: dataclasses.replace(f, vocabulary=vocabulary)
              if isinstance(f.vocabulary, vocabularies.WordPieceVocabulary) else f
              for k, f in base.output_features.items()}
  _add_task(name, _CONVERTERS[task], source=base.source, preprocessors=base.preprocessors,
            output_features=features, postprocess_fn=base.postprocessor,
            metric_fns=base.metric_fns)
  from pretrain_jax.data import glue  # pylint: disable=import-outside-toplevel
  if task in glue.NUM_CLASSES:
    glue.NUM_CLASSES[name] = glue.NUM_CLASSES[task]
  return name


@gin.configurable
def local_text_task(pattern: str = gin.REQUIRED, separator: str = "file",
                    objective: str = "bert", vocabulary=None, name: str = "local_text") -> str:
  """Registers a masked-LM task over the user's files and returns its name (for gin:
  `train.task = @local_text_task()`). Documents get the same fixed 90/5/5 split as BBC."""
  if objective not in MLM_OBJECTIVES:
    raise UserError(f"local_text_task.objective={objective!r}; valid: {sorted(MLM_OBJECTIVES)}")
  documents = corpora.read_local_documents(pattern, separator)
  by_split = {s: corpora.split_documents(documents, s) for s in corpora.SPLITS}
  task_name = f"{name}_{objective}"
  seqio.TaskRegistry.remove(task_name)
  _mlm_task(task_name, _texts_source(by_split.__getitem__, lambda s: len(by_split[s])),
            objective, vocabulary or vocabularies.bbc_wordpiece())
  return task_name


@gin.configurable
def tfds_denoising_task(tfds_name: str = gin.REQUIRED, vocabulary=gin.REQUIRED,
                        objective: str = "span_corruption", text_key: str = "text",
                        splits=(("train", "train"), ("validation", "validation")),
                        name: str | None = None, tfds_data_dir: str | None = None) -> str:
  """A T5 objective over a TFDS text dataset (C4 for the T5X recipe); like tfds_lm_task,
  nothing is read before training and nothing is downloaded."""
  if objective not in DENOISING_OBJECTIVES:
    raise UserError(f"tfds_denoising_task.objective={objective!r}; valid: "
                    f"{DENOISING_OBJECTIVES}")
  task_name = name or objective + "_" + "".join(c if c.isalnum() else "_" for c in tfds_name)
  if task_name not in seqio.TaskRegistry.names():
    source = PreparedTfdsSource(tfds_name, dict(splits), tfds_data_dir)
    _denoising_task(task_name, source, objective, vocabulary, text_key)
  return task_name


@gin.configurable
def tfds_lm_task(tfds_name: str = gin.REQUIRED, vocabulary=gin.REQUIRED, text_key: str = "text",
                 splits=(("train", "train"), ("validation", "validation")),
                 name: str | None = None, tfds_data_dir: str | None = None) -> str:
  """Registers a causal-LM task over a TFDS text dataset (e.g. "c4/en:3.1.0") and returns its
  name, for gin: `train.task = @tfds_lm_task()`. Nothing is read until training starts; the
  dataset must already be prepared in `tfds_data_dir` (default TFDS_DATA_DIR): this code never
  downloads, a missing one is a UserError naming the `tfds build` command (PreparedTfdsSource)."""
  task_name = name or "lm_" + "".join(c if c.isalnum() else "_" for c in tfds_name)
  if task_name not in seqio.TaskRegistry.names():
    _lm_task(task_name, PreparedTfdsSource(tfds_name, dict(splits), tfds_data_dir), vocabulary,
             text_key)
  return task_name


register_bbc_tasks()
