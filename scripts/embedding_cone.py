"""How far a run's input embeddings have collapsed into one direction, by token frequency.

    python scripts/embedding_cone.py runs/bert_tiny runs/finetune_study/bert_bbc_scratch

With tied input/output embeddings, every softmax step pushes the output vectors of tokens that
were not the target the same way; rare tokens are rarely the target, so their embeddings drift
together (Gao et al. 2019, "Representation Degeneration Problem"). Prints, per frequency band of
the BBC training split (ranked by the run's own vocabulary), the mean pairwise cosine and the
mean norm of the token embeddings; a fresh initialisation reads ≈ 0.
"""

from __future__ import annotations

import argparse
import collections

import gin
import numpy as np

from pretrain_jax import registry  # noqa: F401  pylint: disable=unused-import
from pretrain_jax.config import configure
from pretrain_jax.data import corpora
from pretrain_jax.inference import loading

BANDS = ((0, 100), (100, 1000), (1000, 3000), (3000, 7000))


def mean_cosine(x_ND: np.ndarray) -> float:
  x_ND = x_ND / np.linalg.norm(x_ND, axis=-1, keepdims=True)
  n = len(x_ND)
  return float(((x_ND @ x_ND.T).sum() - n) / (n * n - n))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("model_dirs", nargs="+")
  args = parser.parse_args()
  print("| run | step | " + " | ".join(f"ranks {lo}–{hi}" for lo, hi in BANDS) + " |")
  print("|---|---:|" + "---:|" * len(BANDS))
  for model_dir in args.model_dirs:
    gin.clear_config()
    configure([f"{model_dir}/config.gin"], [])
    module, vocab, step = loading.load(model_dir)
    counts = collections.Counter()
    for article in corpora.bbc_articles("train"):
      counts.update(vocab.encode(article["text"]))
    ranked = [token for token, _ in counts.most_common()]
    embed = module.encoder.token_embed if hasattr(module, "encoder") else module.token_embed
    table_VD = np.asarray(embed.embedding[...])
    cells = [f"{mean_cosine(table_VD[ranked[lo:hi]]):.2f} (norm "
             f"{np.linalg.norm(table_VD[ranked[lo:hi]], axis=-1).mean():.2f})"
             for lo, hi in BANDS]
    print(f"| {model_dir} | {step} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
