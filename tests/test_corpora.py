"""The BBC corpus, its fixed split, and the user's own documents."""

import collections
import hashlib
import os

import pytest

from pretrain_jax.data import corpora
from pretrain_jax.errors import UserError


def _bucket(text):
  return int(hashlib.sha256(text.encode()).hexdigest()[:16], 16) % 100


def test_topics_and_counts():
  assert corpora.BBC_TOPICS == tuple(sorted(os.listdir(corpora.bbc_data_dir())))
  articles = [a for s in corpora.SPLITS for a in corpora.bbc_articles(s)]
  assert collections.Counter(a["topic"] for a in articles) == dict(
      business=510, entertainment=386, politics=417, sports=511, tech=401)
  for a in articles:
    assert a["id"].startswith(a["topic"] + "/")
    assert corpora.BBC_TOPICS[a["label"]] == a["topic"]
    assert a["text"] == a["text"].strip() and a["text"].split("\n")[0] == a["title"]


def test_split_sizes_disjoint_and_fixed():
  splits = {s: corpora.bbc_articles(s) for s in corpora.SPLITS}
  assert {s: len(a) for s, a in splits.items()} == dict(train=2033, validation=91, test=101)
  ids = [a["id"] for s in corpora.SPLITS for a in splits[s]]
  assert len(ids) == len(set(ids)) == 2225
  # The split is a function of the text's sha256 alone: no file order, no hash seed.
  bounds = dict(train=(0, 90), validation=(90, 95), test=(95, 100))
  for split, articles in splits.items():
    assert all(bounds[split][0] <= _bucket(a["text"]) < bounds[split][1] for a in articles)
  assert [a["id"] for a in splits["validation"][:3]] == ["business/020", "business/025",
                                                         "business/067"]
  assert [a["id"] for a in splits["test"][:3]] == ["business/014", "business/032",
                                                   "business/033"]


def test_duplicate_articles_share_a_split():
  by_text = collections.defaultdict(set)
  for s in corpora.SPLITS:
    for a in corpora.bbc_articles(s):
      by_text[a["text"]].add(s)
  assert len(by_text) == 2127  # 98 articles are exact duplicates of others
  assert all(len(splits) == 1 for splits in by_text.values())


def test_latin1_article_decoded():
  text = {a["id"]: a["text"] for s in corpora.SPLITS for a in corpora.bbc_articles(s)}
  assert "a £15.8m signing" in text["sports/199"]
  assert not any("\ufffd" in t for t in text.values())


def test_unknown_split():
  with pytest.raises(ValueError, match="dev.*train, validation, test"):
    corpora.bbc_articles("dev")
  with pytest.raises(ValueError, match="dev"):
    corpora.split_documents(["a"], "dev")


def _write(path, text):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(text, encoding="utf-8")


def test_local_documents(tmp_path):
  _write(tmp_path / "b.txt", "Second file.\n\nIts second paragraph.\n")
  _write(tmp_path / "a.txt", "\n  First file, one paragraph.  \n")
  _write(tmp_path / "sub" / "c.txt", "Para one.\n \n\n\t\nPara two\r\nstill two.\r\n")
  _write(tmp_path / "empty.txt", "\n\n")
  files = corpora.read_local_documents(str(tmp_path / "**" / "*.txt"))
  assert files == ["First file, one paragraph.", "Second file.\n\nIts second paragraph.",
                   "Para one.\n \n\n\t\nPara two\nstill two."]
  paragraphs = corpora.read_local_documents(str(tmp_path / "**" / "*.txt"), "blank_line")
  assert paragraphs == ["First file, one paragraph.", "Second file.", "Its second paragraph.",
                        "Para one.", "Para two\nstill two."]
  assert corpora.read_local_documents(str(tmp_path / "*.txt"), "blank_line")[-1] == (
      "Its second paragraph.")


def test_local_documents_errors(tmp_path):
  pattern = str(tmp_path / "*.md")
  with pytest.raises(UserError, match="No file matches.*\\.md"):
    corpora.read_local_documents(pattern)
  _write(tmp_path / "x.md", " \n\n ")
  with pytest.raises(UserError, match="no non-empty document") as e:
    corpora.read_local_documents(pattern, "blank_line")
  assert pattern in str(e.value)
  with pytest.raises(UserError, match="'lines'.*file, blank_line"):
    corpora.read_local_documents(pattern, "lines")


def test_split_documents():
  docs = [f"Document number {i}." for i in range(2000)]
  splits = {s: corpora.split_documents(docs, s) for s in corpora.SPLITS}
  assert sorted(sum(splits.values(), [])) == sorted(docs)
  assert 1700 < len(splits["train"]) < 1900 and 50 < len(splits["test"]) < 150
  assert splits["validation"] == corpora.split_documents(list(reversed(docs)), "validation")[::-1]
