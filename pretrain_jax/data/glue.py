"""Finetuning data for classifiers: BERT's input format and its converter, GLUE's metrics,
and the classification tasks.

BERT (Devlin et al. 2019, §3; Fig. 2):

    one text:  [CLS] a [SEP]              token types  0 … 0
    pairs:     [CLS] a [SEP] b [SEP]      token types  0 … 0  1 … 1   (b [SEP] is segment B)

Importing this module registers (each with its converter, for `tasks.feature_converter`):
  bbc_topic_bert   the bundled BBC articles, label 0..4, BERT format, bundled WordPiece
  polarity_bert    Pang & Lee's movie-review sentences (scripts/fetch_polarity.py), label 1
                   positive / 0 negative, BERT format, bundled WordPiece
  polarity_gpt     the same in GPT-1's format (objectives/classification.py), SentencePiece
  polarity         the same text-to-text (T5): targets 'negative' / 'positive'
  glue_<name>_bert GLUE from TFDS ("glue/<name>:2.0.0", prepared by the user with `tfds build`:
                   nothing is downloaded here) for cola, sst2, mrpc, qqp, stsb (label float32), mnli
                   (validation = validation_matched), qnli, rte, wnli; GLUE's test labels are -1
Registering reads no file. Metric functions are SeqIO's `fn(targets, predictions) -> {name:
value}` over class ids (STS-B: scores), raw values in [0, 1] or [-1, 1], not GLUE's × 100.
"""

from __future__ import annotations

import functools

import gin
import numpy as np
import seqio
import tensorflow as tf

from pretrain_jax.data import corpora, vocabularies
from pretrain_jax.data.tasks import (_ENC_DEC, PreparedTfdsSource, _add_task, _bbc_count,
                                     _bbc_topics, _records_source)
from pretrain_jax.errors import UserError
from pretrain_jax.objectives import classification

# --------------------------------------------------------------------------------------------
# Metrics (numpy; tests check them against scikit-learn and scipy).


def _arrays(targets, predictions) -> tuple[np.ndarray, np.ndarray]:
  t, p = np.asarray(targets), np.asarray(predictions)
  if t.ndim != 1 or t.shape != p.shape:
    raise UserError(f"metrics take two equal-length 1-D sequences; got targets of shape "
                    f"{t.shape} and predictions of shape {p.shape}")
  if not t.size:
    raise UserError("metrics need at least one example; got none")
  return t, p


def accuracy(targets, predictions) -> dict[str, float]:
  """Fraction of predictions equal to their targets, in [0, 1]."""
  t, p = _arrays(targets, predictions)
  return {"accuracy": float(np.mean(t == p))}


def f1(targets, predictions) -> dict[str, float]:
  """Binary F1 of the positive class 1 (MRPC, QQP): 2·TP / (2·TP + FP + FN), in [0, 1];
  0 when neither side has a positive (scikit-learn's zero_division=0)."""
  t, p = _arrays(targets, predictions)
  t, p = t == 1, p == 1
  both = int(t.sum() + p.sum())
  return {"f1": 2.0 * int(np.sum(t & p)) / both if both else 0.0}


def matthews_corrcoef(targets, predictions) -> dict[str, float]:
  """Matthews correlation (CoLA), in [-1, 1]; multi-class by Gorodkin's R_K, which is
  scikit-learn's. 0 when either side holds one class only (undefined; scikit-learn's 0)."""
  t, p = _arrays(targets, predictions)
  _, ids = np.unique(np.concatenate([t, p]), return_inverse=True)
  classes = int(ids.max()) + 1
  confusion_CC = np.zeros((classes, classes))
  np.add.at(confusion_CC, (ids[:t.size], ids[t.size:]), 1.0)
  true_C, predicted_C = confusion_CC.sum(axis=1), confusion_CC.sum(axis=0)
  n, correct = float(t.size), float(np.trace(confusion_CC))
  covariance = correct * n - true_C @ predicted_C
  variances = (n * n - true_C @ true_C) * (n * n - predicted_C @ predicted_C)
  return {"matthews_corrcoef": float(covariance / np.sqrt(variances)) if variances else 0.0}


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
  """NaN where a side is constant (undefined; scipy's NaN too)."""
  x, y = x - x.mean(), y - y.mean()
  norms = np.sqrt(np.dot(x, x) * np.dot(y, y))
  return float(np.clip(np.dot(x, y) / norms, -1.0, 1.0)) if norms else float("nan")


def _ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks, tied values sharing their average rank (scipy's rankdata 'average')."""
  _, ids, counts = np.unique(x, return_inverse=True, return_counts=True)
  last = np.cumsum(counts)
  return (last - (counts - 1) / 2.0)[ids.reshape(-1)]


def pearson_corrcoef(targets, predictions) -> dict[str, float]:
  """Pearson's r (STS-B), in [-1, 1]; NaN when either side is constant (as scipy)."""
  t, p = _arrays(targets, predictions)
  return {"pearson_corrcoef": _pearson(t.astype(np.float64), p.astype(np.float64))}


def spearman_corrcoef(targets, predictions) -> dict[str, float]:
  """Spearman's ρ (STS-B): Pearson's r of the ranks, ties averaged; in [-1, 1], NaN when
  either side is constant (as scipy)."""
  t, p = _arrays(targets, predictions)
  return {"spearman_corrcoef": _pearson(_ranks(t), _ranks(p))}


GLUE_METRICS = {
    "cola": (matthews_corrcoef,),
    "sst2": (accuracy,),
    "mrpc": (f1, accuracy),
    "qqp": (f1, accuracy),
    "stsb": (pearson_corrcoef, spearman_corrcoef),
    "mnli": (accuracy,),
    "qnli": (accuracy,),
    "rte": (accuracy,),
    "wnli": (accuracy,),
}


def glue_metrics(name: str) -> tuple:
  """The metric functions GLUE reports for task `name` ("cola", ..., "wnli")."""
  if name not in GLUE_METRICS:
    raise UserError(f"unknown GLUE task {name!r}; valid: {', '.join(GLUE_METRICS)}")
  return GLUE_METRICS[name]


# --------------------------------------------------------------------------------------------
# BERT's input format and its feature converter.


def bert_format(dataset, sequence_length, output_features, fields=("inputs",)):
  """Tokenized `fields` (one or two; WordPiece ids, no special tokens) → "inputs" =
  [CLS] a [SEP] (b [SEP]) and "token_types" = 0 over [CLS] a [SEP], 1 over b [SEP]; cut to fit
  the inputs length, the longer text first (no cut where SeqIO passes no length)."""
  if len(fields) not in (1, 2):
    raise UserError(f"bert_format takes one or two text fields, got {fields}")
  vocabulary = output_features["inputs"].vocabulary
  if not hasattr(vocabulary, "cls_id"):
    raise UserError(f"bert_format needs a WordPieceVocabulary (with [CLS] and [SEP]) for "
                    f"'inputs', got {vocabulary!r}")
  length = (sequence_length or {}).get("inputs")
  budget = None if length is None else length - 1 - len(fields)  # [CLS], one [SEP] per text
  if budget is not None and budget < len(fields):
    raise UserError(f"sequence length {length} leaves no room for text in BERT's format "
                    f"(it needs >= {2 * len(fields) + 1})")
  cls, sep = tf.constant([vocabulary.cls_id], tf.int32), tf.constant([vocabulary.sep_id], tf.int32)

  def fn(ex):
    a = tf.cast(ex[fields[0]], tf.int32)
    if len(fields) == 1:
      first, second = tf.concat([cls, a[:budget], sep], axis=0), tf.zeros([0], tf.int32)
    else:
      b = tf.cast(ex[fields[1]], tf.int32)
      keep_a, keep_b = (tf.size(a), tf.size(b)) if budget is None else (
          classification.truncate_pair(tf.size(a), tf.size(b), budget))
      first = tf.concat([cls, a[:keep_a], sep], axis=0)
      second = tf.concat([b[:keep_b], sep], axis=0)
    return {**ex, "inputs": tf.concat([first, second], axis=0),
            "token_types": tf.concat([tf.zeros_like(first), tf.ones_like(second)], axis=0)}

  return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


_Spec = seqio.FeatureConverter.FeatureSpec


class BertClassificationFeatureConverter(seqio.FeatureConverter):
  """Model features, unpacked (one example a row, 0-padded to the inputs length L):
  `input_ids` [L] int32, `token_type_ids` [L] int32, `label` int32 class id, or float32 with
  `regression=True` (STS-B)."""
  TASK_FEATURES = {"inputs": _Spec(dtype=tf.int32), "token_types": _Spec(dtype=tf.int32),
                   "label": _Spec(dtype=tf.int32, rank=0)}
  MODEL_FEATURES = {"input_ids": _Spec(dtype=tf.int32), "token_type_ids": _Spec(dtype=tf.int32),
                    "label": _Spec(dtype=tf.int32, rank=0)}
  PACKING_FEATURE_DTYPES = None

  def __init__(self, regression: bool = False, **kwargs):
    self.regression = regression
    label = _Spec(dtype=tf.float32 if regression else tf.int32, rank=0)
    # pylint: disable=invalid-name
    self.TASK_FEATURES = {**type(self).TASK_FEATURES, "label": label}
    self.MODEL_FEATURES = {**type(self).MODEL_FEATURES, "label": label}
    super().__init__(pack=False, **kwargs)

  def __call__(self, ds, task_feature_lengths):
    label = ds.element_spec.get("label")
    expected = self.TASK_FEATURES["label"].dtype
    if label is not None and label.dtype != expected:
      kind, fix = (("a regression task (glue_stsb_bert)", "regression=True")
                   if label.dtype.is_floating else ("a classification task", "regression=False"))
      raise UserError(f"label is {label.dtype.name}, not {expected.name}: for {kind} use "
                      f"BertClassificationFeatureConverter({fix})")
    length = task_feature_lengths["inputs"]
    return super().__call__(ds, {"inputs": length, "token_types": length, "label": 1})

  def _convert_features(self, ds, task_feature_lengths):
    ds = ds.map(lambda ex: {"input_ids": tf.cast(ex["inputs"], tf.int32),
                            "token_type_ids": tf.cast(ex["token_types"], tf.int32),
                            "label": ex["label"]})
    length = task_feature_lengths["inputs"]
    return seqio.utils.trim_and_pad_dataset(ds, {"input_ids": length, "token_type_ids": length})

  def get_model_feature_lengths(self, task_feature_lengths):
    length = task_feature_lengths["inputs"]
    return {"input_ids": length, "token_type_ids": length, "label": 1}


gin.external_configurable(BertClassificationFeatureConverter)
# One factory object for every regression task, so a mixture of them agrees on its converter.
_REGRESSION_CONVERTER = functools.partial(BertClassificationFeatureConverter, regression=True)

# --------------------------------------------------------------------------------------------
# Tasks.

# Classes of each task's classifier head (1: a regression score), for the model side.
NUM_CLASSES: dict[str, int] = {}
# Text-to-text classification tasks: each class's target word, in label order (a T5 run is
# scored by ranking these words' likelihoods: inference/classify.py).
CLASS_WORDS: dict[str, tuple[str, ...]] = {}


def _label_feature(regression: bool) -> seqio.Feature:
  """`label` as a rank-0 output feature, so SeqIO checks its dtype after preprocessing."""
  return seqio.Feature(seqio.PassThroughVocabulary(1), add_eos=False, rank=0,
                       dtype=tf.float32 if regression else tf.int32)


def _bert_task(name: str, source: seqio.DataSource, fields: tuple[str, ...], metric_fns,
               num_classes: int, preprocessors=(), vocabulary=None) -> seqio.Task:
  """Tokenize `fields` with WordPiece, then BERT's format; `label` passes through."""
  wordpiece = seqio.Feature(vocabulary or vocabularies.bbc_wordpiece(), add_eos=False)
  regression = num_classes == 1
  NUM_CLASSES[name] = num_classes
  return _add_task(
      name, _REGRESSION_CONVERTER if regression else BertClassificationFeatureConverter,
      source=source,
      preprocessors=[*preprocessors, seqio.preprocessors.tokenize,
                     functools.partial(bert_format, fields=fields)],
      output_features={"inputs": wordpiece, **{f: wordpiece for f in fields if f != "inputs"},
                       "label": _label_feature(regression)},
      metric_fns=list(metric_fns))


POLARITY_WORDS = ("negative", "positive")


def polarity_label(output_or_target, example=None, is_target=False) -> int:
  """SeqIO postprocessor of the text-to-text `polarity` task: its word → 0 / 1 (-1: neither),
  so its metrics see the class ids the BERT and GPT tasks give."""
  del example, is_target  # SeqIO's postprocessor signature
  text = output_or_target.decode() if isinstance(output_or_target, bytes) else output_or_target
  text = str(text).strip().lower()
  return POLARITY_WORDS.index(text) if text in POLARITY_WORDS else -1


def _polarity_records(split: str) -> dict:
  sentences = corpora.polarity_sentences(split)
  return {"inputs": tf.constant([s["text"] for s in sentences], tf.string),
          "targets": tf.constant([POLARITY_WORDS[s["label"]] for s in sentences], tf.string),
          "label": tf.constant([s["label"] for s in sentences], tf.int32)}


@functools.lru_cache(maxsize=None)
def _polarity_count_at(path: str, split: str) -> int:  # pylint: disable=unused-argument
  return len(corpora.polarity_sentences(split))


def _polarity_count(split: str) -> int:
  """Counted per file path: $PRETRAIN_JAX_DATA_DIR may point elsewhere later."""
  return _polarity_count_at(corpora.polarity_path(), split)


def register_polarity_tasks() -> None:
  source = _records_source(_polarity_records, _polarity_count)
  metric_fns = [accuracy, f1]
  _bert_task("polarity_bert", source, ("inputs",), metric_fns, num_classes=2)
  sentencepiece = vocabularies.bbc_sentencepiece()
  _add_task(  # as tasks.bbc_topic_gpt
      "polarity_gpt", classification.ClassificationFeatureConverter, source=source,
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos,
                     classification.gpt_format],
      output_features={"inputs": seqio.Feature(sentencepiece, add_eos=False),
                       "targets": seqio.Feature(sentencepiece, add_eos=True)},
      metric_fns=metric_fns)
  _add_task(  # as tasks.bbc_topic: inputs cut to fit and closed by EOS
      "polarity", _ENC_DEC, source=source,
      preprocessors=[seqio.preprocessors.tokenize, seqio.preprocessors.append_eos_after_trim],
      output_features={"inputs": seqio.Feature(sentencepiece, add_eos=True),
                       "targets": seqio.Feature(sentencepiece, add_eos=True)},
      postprocess_fn=polarity_label, metric_fns=metric_fns)
  NUM_CLASSES.update(polarity_gpt=2, polarity=2)
  CLASS_WORDS.update(polarity=POLARITY_WORDS)


# name: (text fields, classes; 1 = a regression score)
GLUE_TASKS = {
    "cola": (("sentence",), 2),
    "sst2": (("sentence",), 2),
    "mrpc": (("sentence1", "sentence2"), 2),
    "qqp": (("question1", "question2"), 2),
    "stsb": (("sentence1", "sentence2"), 1),
    "mnli": (("premise", "hypothesis"), 3),
    "qnli": (("question", "sentence"), 2),
    "rte": (("sentence1", "sentence2"), 2),
    "wnli": (("sentence1", "sentence2"), 2),
}
GLUE_VERSION = "2.0.0"


def _glue_splits(name: str) -> dict[str, str]:
  if name == "mnli":
    return {"train": "train", "validation": "validation_matched",
            "validation_mismatched": "validation_mismatched", "test": "test_matched",
            "test_mismatched": "test_mismatched"}
  return {"train": "train", "validation": "validation", "test": "test"}


def _glue_fields(fields: tuple[str, ...], regression: bool):
  """Keep the text fields, `idx` (for GLUE's test submissions) and `label` (int64 → int32)."""
  def preprocessor(dataset):
    return dataset.map(lambda ex: {**{f: ex[f] for f in fields}, "idx": ex["idx"],
                                   "label": tf.cast(ex["label"],
                                                    tf.float32 if regression else tf.int32)},
                       num_parallel_calls=tf.data.AUTOTUNE)
  return preprocessor


def register_glue_tasks() -> None:
  for name, (fields, classes) in GLUE_TASKS.items():
    source = PreparedTfdsSource(f"glue/{name}:{GLUE_VERSION}", splits=_glue_splits(name))
    _bert_task(f"glue_{name}_bert", source, fields, glue_metrics(name), classes,
               preprocessors=[_glue_fields(fields, classes == 1)])


def register_tasks() -> None:
  if "bbc_topic_bert" in seqio.TaskRegistry.names():
    return
  _bert_task("bbc_topic_bert", _records_source(_bbc_topics, _bbc_count), ("inputs",),
             [accuracy], num_classes=len(corpora.BBC_TOPICS))
  CLASS_WORDS.update(bbc_topic=corpora.BBC_TOPICS)  # tasks.py's text-to-text bbc_topic
  register_polarity_tasks()
  register_glue_tasks()


register_tasks()
