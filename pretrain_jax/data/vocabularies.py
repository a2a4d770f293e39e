"""SeqIO vocabularies: BERT-style WordPiece and the bundled BBC WordPiece / SentencePiece files."""

import functools
import importlib.resources
import os
import re

import gin
import numpy as np
import seqio
import tensorflow as tf
import tensorflow_text as tf_text

from pretrain_jax.errors import UserError

# Readable decoding: BERT splits off every punctuation mark, so glue the common ones back
# ("the cat sat ." -> "the cat sat.", "£ 5 . 3m" -> "£5.3m", "don ' t" -> "don't",
# "fans ' " -> "fans' "). Lossy on purpose (for reading predictions; quotes and hyphens stay
# spaced); the same RE2-compatible rules serve Python and TF.
_DETOKENIZE_RULES = (
    (r" ##", ""),
    (r"^##", ""),
    (r"(\d) ([.,]) (\d)", r"\1\2\3"),
    (r" ([.,!?;:%)\]}])", r"\1"),
    (r"([(\[{$£]) ", r"\1"),
    (r" ' (s|t|m|d|re|ve|ll)\b", r"'\1"),
    (r"s ' ", "s' "),
    (r"\b([od]) ' (\w)", r"\1'\2"),  # o'neill, d'arcy
)


def _package_file(name: str) -> str:
  return str(importlib.resources.files("pretrain_jax.data") / "vocabs" / name)


class WordPieceVocabulary(seqio.Vocabulary):
  """Uncased BERT WordPiece over a vocab.txt (one token per line), via tensorflow_text.

  Special tokens are looked up by name, so both the bundled vocab ([PAD]=0 ... [MASK]=4) and
  Google's BERT vocab ([PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103) work. BERT has no
  EOS: `eos_id` is None, which seqio's Vocabulary allows (decode then does not stop at EOS);
  features using it need `add_eos=False` (seqio's append_eos would fail on None).
  """

  def __init__(self, vocab_file: str):
    self._vocab_file = vocab_file
    self._tokens = read_wordpiece_tokens(vocab_file)
    self._ids = {t: i for i, t in enumerate(self._tokens)}
    self._tokenizer = None  # Built lazily: TF resources do not pickle.
    super().__init__(extra_ids=0)

  def __getstate__(self):
    return {**self.__dict__, "_tokenizer": None}

  def __eq__(self, other):
    return isinstance(other, WordPieceVocabulary) and other._vocab_file == self._vocab_file

  def __hash__(self):
    return hash((WordPieceVocabulary, self._vocab_file))

  def __repr__(self):
    return f"WordPieceVocabulary({self._vocab_file!r})"

  def _id(self, token: str) -> int:
    if token not in self._ids:
      raise ValueError(f"{self._vocab_file} has no {token} token.")
    return self._ids[token]

  @property
  def tokens(self) -> list[str]:
    return self._tokens

  pad_id = property(lambda self: self._id("[PAD]"))
  unk_id = property(lambda self: self._id("[UNK]"))
  cls_id = property(lambda self: self._id("[CLS]"))
  sep_id = property(lambda self: self._id("[SEP]"))
  mask_id = property(lambda self: self._id("[MASK]"))

  @property
  def eos_id(self) -> None:
    return None

  @property
  def bos_id(self) -> None:
    return None

  @property
  def _base_vocab_size(self) -> int:
    return len(self._tokens)

  @functools.cached_property
  def special_ids(self) -> np.ndarray:
    """Ids of every bracketed token ([PAD], [CLS], [unused0], ...): never masked or predicted."""
    return np.array([i for i, t in enumerate(self._tokens) if re.fullmatch(r"\[[^\[\]]+\]", t)])

  @functools.cached_property
  def word_start(self) -> np.ndarray:
    """True where a token begins a word (no "##"): whole-word masking groups on it."""
    return np.array([not t.startswith("##") for t in self._tokens])

  @property
  def tokenizer(self) -> tf_text.BertTokenizer:
    if self._tokenizer is None:
      # init_scope: create the table eagerly even when first used inside a tf.data map, so a
      # second graph can still use it.
      with tf.init_scope():
        table = tf.lookup.StaticVocabularyTable(
            tf.lookup.KeyValueTensorInitializer(
                self._tokens, tf.range(len(self._tokens), dtype=tf.int64)), num_oov_buckets=1)
        self._tokenizer = tf_text.BertTokenizer(
            table, lower_case=True, token_out_type=tf.int64, unknown_token="[UNK]")
    return self._tokenizer

  def _encode_tf(self, s):
    """Scalar string -> 1-D int32 ids; 1-D batch of strings -> RaggedTensor [batch, None]."""
    s = tf.convert_to_tensor(s, tf.string)
    ids = self.tokenizer.tokenize(tf.reshape(s, [-1]) if s.shape.rank == 0 else s)
    ids = tf.cast(ids.merge_dims(-2, -1), tf.int32)  # [batch, words, pieces] -> [batch, ids]
    return ids[0] if s.shape.rank == 0 else ids

  def _decode_tf(self, ids):
    ids = tf.convert_to_tensor(ids)
    tokens = tf.ragged.boolean_mask(tf.gather(self._tokens, ids), tf.not_equal(ids, self.pad_id))
    text = tf.strings.reduce_join(tokens, axis=-1, separator=" ")
    for pattern, rewrite in _DETOKENIZE_RULES:
      text = tf.strings.regex_replace(text, pattern, rewrite)
    return text

  def _encode(self, s: str) -> list[int]:
    return self._encode_tf(tf.constant(s)).numpy().tolist()

  def _decode(self, ids) -> str:
    text = " ".join(self._tokens[i] for i in ids if i != self.pad_id)
    for pattern, rewrite in _DETOKENIZE_RULES:
      text = re.sub(pattern, rewrite, text)
    return text


# Special tokens a BERT WordPiece vocabulary must hold (looked up by name).
WORDPIECE_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
_VOCAB_TXT = "a vocab.txt lists one WordPiece a line, [PAD] [UNK] [CLS] [SEP] [MASK] among them"


def _read_bytes(path: str, what: str) -> bytes:
  if tf.io.gfile.isdir(path):
    raise UserError(f"{what}{path!r} is a directory; give a file")
  with tf.io.gfile.GFile(path, "rb") as f:
    return f.read()


def _is_sentencepiece_model(data: bytes) -> bool:
  from sentencepiece import sentencepiece_model_pb2  # pylint: disable=import-outside-toplevel
  try:
    return len(sentencepiece_model_pb2.ModelProto.FromString(data).pieces) > 0
  except Exception:  # pylint: disable=broad-except
    return False


def read_wordpiece_tokens(vocab_file: str, what: str = "WordPiece vocab file ") -> list[str]:
  """The tokens of a WordPiece vocab.txt, one a line; UserError naming the file (after `what`,
  say "with_wordpiece.vocab_file=") when it is empty, not UTF-8 text (a binary file, a
  SentencePiece model) or lacks BERT's special tokens."""
  data = _read_bytes(vocab_file, what)
  if not data.strip():
    raise UserError(f"{what}{vocab_file!r} is empty; {_VOCAB_TXT}")
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    if _is_sentencepiece_model(data):
      raise UserError(f"{what}{vocab_file!r} is a SentencePiece model, not a vocab.txt; "
                      f"{_VOCAB_TXT}") from None
    raise UserError(f"{what}{vocab_file!r} is not UTF-8 text (byte "
                    f"0x{data[e.start]:02x} at offset {e.start}: a binary file?); "
                    f"{_VOCAB_TXT}") from None
  if "\0" in text:
    raise UserError(f"{what}{vocab_file!r} is not text (a NUL byte at offset "
                    f"{text.index(chr(0))}: a binary file?); {_VOCAB_TXT}")
  tokens = [line.rstrip("\r") for line in text.split("\n")]
  if tokens and tokens[-1] == "":  # the final newline ends the last line, it opens none
    tokens.pop()
  missing = [t for t in WORDPIECE_SPECIALS if t not in set(tokens)]
  if missing:
    raise UserError(f"{what}{vocab_file!r} ({len(tokens)} lines) has no "
                    f"{' '.join(missing)} token{'s' if len(missing) > 1 else ''}: not a BERT "
                    f"vocabulary; {_VOCAB_TXT}")
  return tokens


def check_sentencepiece_model(model_file: str, what: str = "SentencePiece model ") -> None:
  """UserError naming `model_file` (after `what`) unless it holds a SentencePiece model that
  loads: seqio reads it only at first use, deep inside a tf.data graph or a training step."""
  import sentencepiece  # pylint: disable=import-outside-toplevel
  data = _read_bytes(model_file, what)
  hint = "give the .model file spm_train wrote (not its .vocab, nor a WordPiece vocab.txt)"
  if not data:
    raise UserError(f"{what}{model_file!r} is empty; {hint}")
  try:
    sentencepiece.SentencePieceProcessor().LoadFromSerializedProto(data)
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "ParseFromArray" in reason:  # not a serialized ModelProto at all
      try:
        data.decode("utf-8")
        reason = "it is a text file"
      except UnicodeDecodeError:
        reason = "its bytes do not parse as one"
    raise UserError(f"{what}{model_file!r} is not a SentencePiece model ({reason}); "
                    f"{hint}") from None


@functools.lru_cache(maxsize=None)
def bbc_wordpiece() -> WordPieceVocabulary:
  """Uncased WordPiece, 8k tokens, trained on the BBC train split by scripts/train_vocab.py."""
  return WordPieceVocabulary(_package_file("bbc_wordpiece_uncased_8k.txt"))


@functools.lru_cache(maxsize=None)
def bbc_sentencepiece(extra_ids: int = 100) -> seqio.SentencePieceVocabulary:
  """T5-style SentencePiece unigram (pad 0, eos 1, unk 2; sentinels count down from the top)."""
  return seqio.SentencePieceVocabulary(_package_file("bbc_sentencepiece_8k.model"), extra_ids)


@gin.configurable
def sentencepiece_vocabulary(model_file: str = gin.REQUIRED,
                             extra_ids: int = 0) -> seqio.SentencePieceVocabulary:
  """The user's SentencePiece model (for gin: `vocabulary = @sentencepiece_vocabulary()`)."""
  if not model_file:
    raise UserError("sentencepiece_vocabulary.model_file is not set (the experiment configs "
                    "take it from VOCAB_FILE: --gin.VOCAB_FILE=\"'/path/spm.model'\")")
  if not os.path.exists(model_file) and "://" not in model_file:
    raise UserError(f"sentencepiece_vocabulary.model_file={model_file!r}: no such file")
  check_sentencepiece_model(model_file, "sentencepiece_vocabulary.model_file=")
  return seqio.SentencePieceVocabulary(model_file, extra_ids)
