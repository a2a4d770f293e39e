"""The masked-LM data pipeline on real text: statistics, show-data, dynamic masks, resume."""

import json
import os
import subprocess
import sys

import gin
import numpy as np
import pytest

from pretrain_jax.data import pipeline, tasks, vocabularies
from pretrain_jax.objectives.masked_lm import MaskedLmFeatureConverter

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


def test_show_data_json_and_list():
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  run = lambda *a: subprocess.run([sys.executable, "-m", "pretrain_jax", "show-data", *a],
                                  cwd=REPO, env=env, capture_output=True, text=True, check=True)
  listed = run("--list").stdout
  assert all(f"task     bbc_{t}" in listed for t in tasks.MLM_OBJECTIVES)
  out = run("--task=bbc_bert", "--num=3", "--json", "--sequence_length=64").stdout
  rows = [json.loads(line) for line in out.strip().splitlines()]
  assert len(rows) == 3
  for row in rows:
    assert {"inputs", "targets", "loss_weights", "segment_ids", "nsp_label", "inputs_text",
            "targets_text"} <= set(row)
    assert row["targets_text"].startswith("[CLS] ") and row["targets_text"].endswith("[SEP]")
    assert len(row["inputs"]) == len(row["targets"]) == len(row["loss_weights"]) <= 64
    if any(row["loss_weights"]):
      assert "[MASK]" in row["inputs_text"] or row["inputs"] != row["targets"]


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
