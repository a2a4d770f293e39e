"""The data pipeline on real text: masked-LM statistics, show-data of every task, batch shapes
ahead of time, dynamic masks, resume."""

import json
import os
import shutil
import subprocess
import sys

import gin
import jax
import numpy as np
import pytest
import seqio

from pretrain_jax.data import pipeline, show, tasks, vocabularies
from pretrain_jax.errors import UserError
from pretrain_jax.objectives.masked_lm import MaskedLmFeatureConverter

import toy_models  # noqa: E402  (tests/)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VOCAB = vocabularies.bbc_wordpiece()


def _examples(task, num, length=128, split="train", seed=0, shuffle=True):
  gin.clear_config()
  ds = pipeline._dataset(task, {"inputs": length, "targets": length}, MaskedLmFeatureConverter(),
                         split, seed, shuffle=shuffle)
  return list(ds.take(num).as_numpy_iterator())


def test_bert_task_statistics_on_real_text():
  examples = _examples("bbc_bert", 1200)
  targets = np.stack([e["targets"] for e in examples])
  inputs = np.stack([e["inputs"] for e in examples])
  weights = np.stack([e["loss_weights"] for e in examples])
  special = np.isin(targets, VOCAB.special_ids)
  candidates = (~special).sum()
  selected = weights > 0
  assert candidates > 100_000
  assert not (selected & special).any(), "a special token was selected"
  assert (inputs[~selected] == targets[~selected]).all(), "only selected tokens change"
  rate = selected.sum() / candidates
  as_mask = (inputs[selected] == VOCAB.mask_id).mean()
  unchanged = (inputs[selected] == targets[selected]).mean()
  print(f"{candidates} candidate tokens: selected {rate:.4f}, [MASK] {as_mask:.4f}, "
        f"unchanged {unchanged:.4f}, random {1 - as_mask - unchanged:.4f}")
  assert abs(rate - 0.15) < 0.005
  assert abs(as_mask - 0.80) < 0.01 and abs(unchanged - 0.10) < 0.01
  # Structure: [CLS] A [SEP] B [SEP] with segment ids 0 then 1; NSP labels balanced.
  assert (targets[:, 0] == VOCAB.cls_id).all()
  assert ((targets == VOCAB.sep_id).sum(1) == 2).all()
  labels = np.array([e["nsp_label"] for e in examples])
  print(f"NSP 'random next' fraction {labels.mean():.3f} over {len(labels)}")
  assert abs(labels.mean() - 0.5) < 0.05  # 1,200 pairs: 3.5 standard deviations
  for e in examples[:50]:
    first_sep = int(np.argmax(e["targets"] == VOCAB.sep_id))
    real = e["targets"] != VOCAB.pad_id
    assert (e["segment_ids"][:first_sep + 1] == 0).all()
    assert (e["segment_ids"][first_sep + 1:][real[first_sep + 1:]] == 1).all()


def test_whole_word_and_span_tasks_select_whole_words():
  for task in ("bbc_bert_wwm", "bbc_spanbert"):
    for e in _examples(task, 100):
      selected = e["loss_weights"] > 0
      t = e["targets"]
      # A "##" piece continues the word before it, unless truncation left it after a special.
      continues = ~VOCAB.word_start[t[1:]] & ~np.isin(t[:-1], VOCAB.special_ids)
      for i in np.flatnonzero(continues) + 1:
        assert selected[i] == selected[i - 1], f"{task}: word split at {i}"
  spanbert = _examples("bbc_spanbert", 20)
  assert all("nsp_label" not in e and (e["segment_ids"] == 0).all() for e in spanbert)


# The model features each converter makes (nsp_label too when the task makes sentence pairs).
CONVERTER_FEATURES = {
    "MaskedLmFeatureConverter": {"inputs", "targets", "loss_weights", "segment_ids"},
    "CausalLmFeatureConverter": {"decoder_input_tokens", "decoder_target_tokens",
                                 "decoder_loss_weights", "decoder_segment_ids",
                                 "decoder_positions"},
    "EncDecFeatureConverter": {"encoder_input_tokens", "encoder_segment_ids",
                               "encoder_positions", "decoder_input_tokens",
                               "decoder_target_tokens", "decoder_loss_weights",
                               "decoder_segment_ids", "decoder_positions"},
    "ClassificationFeatureConverter": {"tokens", "label"},
    "BertClassificationFeatureConverter": {"input_ids", "token_type_ids", "label"},
}
# Tasks over data that does not install with the package (a download, a prepared TFDS set);
# tests/test_glue.py covers them with fixtures.
FETCHED_DATA = ("polarity", "glue_")


def _show(capsys, **kwargs) -> str:
  capsys.readouterr()
  show.main(**{"task": None, "split": "train", "num": 1, "as_json": True, "list_tasks": False,
               "sequence_length": 64, **kwargs})
  return capsys.readouterr().out


def test_show_data_of_every_task_uses_its_own_converter(capsys):
  """No gin file: each task (and mixture) is shown through its objective's converter."""
  gin.clear_config()
  listed = [line.split()[1] for line in _show(capsys, list_tasks=True).splitlines()]
  assert {f"bbc_{t}" for t in tasks.MLM_OBJECTIVES} | {"bbc_lm", "bbc_span_corruption",
                                                      "bbc_topic_gpt"} <= set(listed)
  for name in listed:
    if name.startswith(FETCHED_DATA):
      continue
    rows = [json.loads(line) for line in _show(capsys, task=name).splitlines()]
    assert len(rows) == 1, name
    features = {k for k in rows[0] if not k.endswith("_text")}
    expected = CONVERTER_FEATURES[type(tasks.feature_converter(name)).__name__]
    assert expected <= features <= expected | {"nsp_label"}, (name, features)
  out = _show(capsys, task="bbc_bert", num=3)
  rows = [json.loads(line) for line in out.strip().splitlines()]
  assert len(rows) == 3
  for row in rows:
    assert {"nsp_label", "inputs_text", "targets_text"} <= set(row)
    assert row["targets_text"].startswith("[CLS] ") and row["targets_text"].endswith("[SEP]")
    assert len(row["inputs"]) == len(row["targets"]) == len(row["loss_weights"]) <= 64
    if any(row["loss_weights"]):
      assert "[MASK]" in row["inputs_text"] or row["inputs"] != row["targets"]


def test_show_data_cli_shows_a_t5_task_without_a_gin_file():
  """Once it applied the masked-LM converter to every task and died with a traceback."""
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  out = subprocess.run([sys.executable, "-m", "pretrain_jax", "show-data",
                        "--task=bbc_span_corruption", "--num=1", "--json",
                        "--sequence_length=64"],
                       cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
  row = json.loads(out)
  assert CONVERTER_FEATURES["EncDecFeatureConverter"] <= set(row)
  assert "<extra_id_0>" in row["encoder_input_tokens_text"]


def test_show_data_of_an_unknown_task_or_converter_is_one_user_error():
  gin.clear_config()
  with pytest.raises(UserError, match=r"unknown task or mixture 'bbc_nope'; registered: bbc_"):
    show.main("bbc_nope", "train", 1, True, False, 64)
  name = "test_task_without_converter"
  seqio.TaskRegistry.add(name, source=seqio.FunctionDataSource(lambda split, shuffle_files: None,
                                                               splits=["train"]),
                         preprocessors=[], output_features={})
  seqio.MixtureRegistry.add("test_mixed_objectives",
                            [("bbc_topic", 1.0), ("bbc_topic_gpt", 1.0)])
  try:
    with pytest.raises(UserError, match=f"{name}.*train.feature_converter"):
      show.main(name, "train", 1, True, False, 64)
    with pytest.raises(UserError, match="'test_mixed_objectives' mixes tasks of different "
                       r"feature converters \(ClassificationFeatureConverter, EncDec"):
      show.main("test_mixed_objectives", "train", 1, True, False, 64)
  finally:
    seqio.TaskRegistry.remove(name)
    seqio.MixtureRegistry.remove("test_mixed_objectives")


@pytest.mark.parametrize("task,lengths", [
    ("bbc_bert", {"inputs": 32, "targets": 32}),  # masked LM + NSP
    ("bbc_lm", {"inputs": 32, "targets": 32}),  # causal LM, packed
    ("bbc_span_corruption", {"inputs": 64, "targets": 16}),  # T5, packed
    ("bbc_topic_gpt", {"inputs": 32, "targets": 32}),  # classification
])
def test_batch_spec_is_a_real_batch_without_reading_one(task, lengths):
  gin.clear_config()
  spec = pipeline.batch_spec(task, lengths, tasks.feature_converter(task), batch_size=2)
  batch = next(pipeline.TrainBatches(task, lengths, tasks.feature_converter(task), 2, seed=0))
  assert {k: (v.shape, v.dtype) for k, v in spec.items()} == (
      {k: (v.shape, v.dtype) for k, v in batch.items()})
  assert all(isinstance(v, jax.ShapeDtypeStruct) for v in spec.values())


@pytest.fixture
def small_corpus(tmp_path):
  rng = np.random.default_rng(0)
  words = VOCAB.tokens[200:1200]
  for d in range(60):
    sentences = [" ".join(rng.choice(words, rng.integers(5, 15))).capitalize() + "."
                 for _ in range(rng.integers(3, 8))]
    (tmp_path / f"doc{d:02d}.txt").write_text(" ".join(sentences))
  gin.clear_config()
  return tasks.local_text_task(pattern=str(tmp_path / "*.txt"), objective="roberta",
                               name="test_corpus")


def test_masks_change_with_the_epoch_seed():
  """RoBERTa's dynamic masking: the same text, masked afresh for each epoch's seed."""
  first = _examples("bbc_roberta", 50, seed=0, shuffle=False)
  second = _examples("bbc_roberta", 50, seed=1, shuffle=False)
  assert all(np.array_equal(a["targets"], b["targets"]) for a, b in zip(first, second))
  differ = [not np.array_equal(a["loss_weights"], b["loss_weights"])
            for a, b in zip(first, second)]
  assert np.mean(differ) > 0.9


def test_epochs_differ_and_resume_is_exact(small_corpus):
  lengths = {"inputs": 32, "targets": 32}
  data = pipeline.TrainBatches(small_corpus, lengths, MaskedLmFeatureConverter(), 4, seed=0)
  stream = []
  while data.position["epoch"] < 2:
    stream.append((dict(data.position), next(data)))
  epoch0 = [b for p, b in stream if p["epoch"] == 0]
  epoch1 = [b for p, b in stream if p["epoch"] == 1]
  assert len(epoch0) >= 10
  assert not np.array_equal(epoch0[0]["targets"], epoch1[0]["targets"]), "epoch 1 replays 0"
  # Resuming from any recorded position continues with exactly the same batches.
  for k in (3, len(epoch0) + 2):
    position, _ = stream[k]
    resumed = pipeline.TrainBatches(small_corpus, lengths, MaskedLmFeatureConverter(), 4,
                                    seed=0, position=position)
    for _, expected in stream[k:k + 3]:
      got = next(resumed)
      assert all(np.array_equal(got[f], expected[f]) for f in expected)


def _same(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) and a[k].dtype == b[k].dtype
                                      for k in a)


def test_a_restored_iterator_state_continues_bitwise_mid_epoch_and_across_epochs(
    small_corpus, tmp_path, capsys):
  """The checkpointed iterator (no replay) gives exactly the uninterrupted batches, from inside
  an epoch and from its last batch (the next one is epoch 1's first)."""
  lengths = {"inputs": 32, "targets": 32}
  make = lambda **kw: pipeline.TrainBatches(small_corpus, lengths, MaskedLmFeatureConverter(),
                                            8, seed=0, **kw)
  data, saved, stream = make(), {}, []
  while data.position["epoch"] < 1 or data.position["batch"] < 3:
    if data.position["batch"] == 2 and data.position["epoch"] == 0:
      data.save_state(str(tmp_path / "mid"))
      saved["mid"] = (dict(data.position), len(stream))
    stream.append(next(data))
    if data.position == {"epoch": 0, "batch": data.position["batch"]}:
      end = dict(data.position)
  epoch_length = end["batch"]
  assert epoch_length >= 4
  # The last batch of epoch 0: replay to it, save there, as the trainer would.
  last = make(position=end)
  last.save_state(str(tmp_path / "end"))
  saved["end"] = (end, epoch_length)
  for name, (position, k) in saved.items():
    resumed = make(position=position, state_dir=str(tmp_path / name))
    assert resumed.restored, name
    for expected in stream[k:k + 3]:
      assert _same(next(resumed), expected), name
    assert resumed.position["epoch"] == (1 if name == "end" else 0)
  assert "warning" not in capsys.readouterr().err


def test_a_missing_damaged_or_mismatched_iterator_state_is_announced_and_replayed(
    small_corpus, tmp_path, capsys):
  lengths = {"inputs": 32, "targets": 32}
  make = lambda **kw: pipeline.TrainBatches(small_corpus, lengths, MaskedLmFeatureConverter(),
                                            8, seed=0, **kw)
  data = make()
  stream = [next(data) for _ in range(4)]
  data = make(position={"epoch": 0, "batch": 2})
  data.save_state(str(tmp_path / "state"))
  (tmp_path / "damaged").mkdir()
  for f in (tmp_path / "state").iterdir():
    content = f.read_bytes()
    (tmp_path / "damaged" / f.name).write_bytes(
        content if f.name == "position.json" else content[:len(content) // 2])
  cases = {"missing": ({"epoch": 0, "batch": 2}, "FileNotFoundError"),
           "damaged": ({"epoch": 0, "batch": 2}, ""),
           "state": ({"epoch": 0, "batch": 1}, "batch differ")}  # another position's state
  for name, (position, reason) in cases.items():
    resumed = make(position=position, state_dir=str(tmp_path / name))
    err = capsys.readouterr().err
    assert not resumed.restored and err.count("\n") == 1 and reason in err, (name, err)
    assert f"warning: no usable data-iterator state in {tmp_path / name}" in err
    assert f"replaying {position['batch']} batches of epoch 0" in err
    assert _same(next(resumed), stream[position["batch"]]), name


def test_iterator_states_are_pruned_with_their_checkpoints(tmp_path):
  for step in (10, 20, 30):
    os.makedirs(pipeline.iterator_state_dir(str(tmp_path), step))
  pipeline.prune_iterator_states(str(tmp_path), {20, 30})
  assert sorted(os.listdir(tmp_path / pipeline.ITERATOR_DIR)) == ["20", "30"]
  assert os.listdir(tmp_path / pipeline.ITERATOR_DIR / "30") == ["process_0"]



_TOY_GIN = toy_models.TRAIN_GIN + """
train.log_every = 3
train.eval_every = 0
train.checkpoint_every = 3
train.keep_checkpoints = 2
"""


def test_the_trainer_keeps_an_iterator_state_per_checkpoint_and_resumes_from_it(
    tmp_path, capsys):
  """In process, a toy LM: the states follow the checkpoints orbax keeps; a resume restores
  the state (nothing announced); without it the resume says so in one line and replays."""
  import helpers  # pylint: disable=import-outside-toplevel  (tests/, as toy_models)
  gin_file = tmp_path / "toy.gin"
  gin_file.write_text(_TOY_GIN)
  run = tmp_path / "run"
  kept = lambda: (sorted(os.listdir(run / pipeline.ITERATOR_DIR), key=int),
                  sorted((d for d in os.listdir(run / "checkpoints") if d.isdigit()), key=int))
  helpers.train(run, [str(gin_file)], ["train.num_steps = 6"])
  assert kept() == (["3", "6"], ["3", "6"])
  capsys.readouterr()
  helpers.train(run, [str(gin_file)], ["train.num_steps = 9"])
  assert "no usable data-iterator state" not in capsys.readouterr().err
  assert kept() == (["6", "9"], ["6", "9"])
  shutil.rmtree(run / pipeline.ITERATOR_DIR / "9")
  helpers.train(run, [str(gin_file)], ["train.num_steps = 12"])
  err = capsys.readouterr().err
  assert err.count("no usable data-iterator state") == 1, err
  assert "replaying 9 batches of epoch 0" in err
  assert kept() == (["12"], ["9", "12"])  # 9 has no state now: the replay did not make one


def test_an_iterator_that_cannot_be_checkpointed_says_so_once_and_writes_no_state(
    tmp_path, capsys):
  """SpanBERT's span masking runs a Python function inside tf.data: its iterator cannot be
  serialised. The run keeps going; a resume replays (announced), nothing half-written."""
  task = "bbc_spanbert"
  data = pipeline.TrainBatches(task, pipeline.feature_lengths(32), tasks.feature_converter(task),
                               8, seed=0)
  next(data)
  for step in (1, 2):
    data.save_state(str(tmp_path / str(step)))
  assert os.listdir(tmp_path) == []
  lines = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning:")]
  assert len(lines) == 1 and "'bbc_spanbert' cannot be checkpointed" in lines[0], lines
