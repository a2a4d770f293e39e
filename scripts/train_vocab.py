"""Train a WordPiece or SentencePiece vocabulary on the BBC train split or on your own files.

The bundled vocabularies in pretrain_jax/data/vocabs/ are this script's output:

  python scripts/train_vocab.py --kind wordpiece --vocab_size 8192 \
      --output pretrain_jax/data/vocabs/bbc_wordpiece_uncased_8k.txt
  python scripts/train_vocab.py --kind sentencepiece --vocab_size 8000 \
      --output pretrain_jax/data/vocabs/bbc_sentencepiece_8k.model
"""

import argparse
import time

from pretrain_jax.data import corpora
from pretrain_jax.errors import UserError

RESERVED_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(docs: list[str], vocab_size: int, output: str) -> int:
  """Uncased BERT WordPiece; the reserved tokens take ids 0..4."""
  import tensorflow as tf
  from tensorflow_text.tools.wordpiece_vocab import bert_vocab_from_dataset

  vocab = bert_vocab_from_dataset.bert_vocab_from_dataset(
      tf.data.Dataset.from_tensor_slices(docs).batch(256), vocab_size=vocab_size,
      reserved_tokens=RESERVED_TOKENS, bert_tokenizer_params=dict(lower_case=True))
  with open(output, "w", encoding="utf-8") as f:
    f.writelines(token + "\n" for token in vocab)
  return len(vocab)


def train_sentencepiece(docs: list[str], vocab_size: int, output: str) -> int:
  """T5-style unigram model: pad 0, eos 1, unk 2, no bos; single-threaded so reruns match.

  character_coverage=1.0 keeps every character seen (BBC has 88; the default 0.9995 drops
  '&', '@', ... to <unk>).
  """
  import sentencepiece as spm

  # SentencePiece reads one sentence per line; whole articles exceed its 4 KB line limit.
  lines = [line for doc in docs for line in doc.split("\n") if line.strip()]
  spm.set_random_generator_seed(0)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=output.removesuffix(".model"),
      model_type="unigram", vocab_size=vocab_size, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      character_coverage=1.0, num_threads=1, minloglevel=2)
  return spm.SentencePieceProcessor(model_file=output).get_piece_size()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--kind", required=True, choices=["wordpiece", "sentencepiece"])
  parser.add_argument("--vocab_size", type=int, required=True)
  parser.add_argument("--output", required=True,
                      help="vocab.txt for wordpiece; NAME.model for sentencepiece (+ NAME.vocab)")
  parser.add_argument("--files", help="glob of your own text files (default: BBC train split)")
  parser.add_argument("--separator", default="file", choices=corpora.SEPARATORS)
  args = parser.parse_args()
  if args.kind == "sentencepiece" and not args.output.endswith(".model"):
    parser.error("--output must end in .model for sentencepiece")

  if args.files:
    try:
      docs = corpora.read_local_documents(args.files, args.separator)
    except UserError as e:
      parser.exit(1, f"error: {e}\n")
    # Hold out the same documents the tasks hold out (all of them if the split is empty).
    docs = corpora.split_documents(docs, "train") or docs
  else:
    docs = [a["text"] for a in corpora.bbc_articles("train")]
  start = time.perf_counter()
  train = train_wordpiece if args.kind == "wordpiece" else train_sentencepiece
  size = train(docs, args.vocab_size, args.output)
  print(f"Trained a {args.kind} vocabulary of {size} tokens on {len(docs)} documents "
        f"in {time.perf_counter() - start:.1f} s: {args.output}")


if __name__ == "__main__":
  main()
