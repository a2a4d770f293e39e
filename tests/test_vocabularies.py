"""The bundled WordPiece and SentencePiece vocabularies."""

import pickle
import re

import numpy as np
import tensorflow as tf

from pretrain_jax.data import corpora, vocabularies


def _bbc_sentences(pattern=r"[A-Za-z0-9 ,.£%]+"):
  """Real held-out BBC sentences made only of ordinary characters (no "suprnova.org")."""
  sentences = [s for a in corpora.bbc_articles("validation")
               for s in re.split(r"(?<=\.)\s+", a["text"].split("\n", 1)[1].strip())]
  return [s for s in sentences if re.fullmatch(pattern, s) and not re.search(r"[a-z]\.\w", s)]


def test_wordpiece_special_ids():
  v = vocabularies.bbc_wordpiece()
  assert v.tokens[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
  assert (v.pad_id, v.unk_id, v.cls_id, v.sep_id, v.mask_id) == (0, 1, 2, 3, 4)
  assert v.eos_id is None
  np.testing.assert_array_equal(v.special_ids, [0, 1, 2, 3, 4])
  assert 7500 < v.vocab_size == len(v.tokens) <= 8192


def test_word_start():
  v = vocabularies.bbc_wordpiece()
  assert v.word_start.shape == (v.vocab_size,) and v.word_start.dtype == bool
  assert not v.word_start[v.tokens.index("##able")]
  assert v.word_start[v.tokens.index("un")] and v.word_start[v.tokens.index("the")]


def test_wordpiece_round_trip_on_bbc_sentences():
  v = vocabularies.bbc_wordpiece()
  sentences = _bbc_sentences()
  assert len(sentences) > 300
  ids = v.encode_tf(tf.constant(sentences))
  assert isinstance(ids, tf.RaggedTensor) and ids.dtype == tf.int32
  for sentence, row in zip(sentences, ids.to_list()):
    assert v.decode(row) == sentence.lower()


def test_wordpiece_decode_is_readable():
  v = vocabularies.bbc_wordpiece()
  assert v.decode([v.tokens.index("un"), v.tokens.index("##able"), v.pad_id]) == "unable"
  for text in ["The cat sat.", "Profits rose 3.5% to £1,200m, didn't they?", "O'Neill's (new) job"]:
    assert v.decode(v.encode(text)) == text.lower()
  batch = [v.encode("the cat sat."), v.encode("it's")]
  padded = tf.ragged.constant(batch).to_tensor(v.pad_id)
  assert v.decode_tf(padded).numpy().tolist() == [b"the cat sat.", b"it's"]
  assert v.decode_tf(tf.constant(batch[0])).numpy() == b"the cat sat."


def test_wordpiece_in_tf_data():
  v = vocabularies.bbc_wordpiece()
  texts = ["The cat sat.", "Unbelievable results at the BBC"]
  batched = tf.data.Dataset.from_tensor_slices(texts).batch(2).map(v.encode_tf)
  (ragged,) = list(batched)
  single = list(tf.data.Dataset.from_tensor_slices(texts).map(v.encode_tf))
  assert single[0].shape.rank == 1 and single[0].dtype == tf.int32
  assert ragged.to_list() == [t.numpy().tolist() for t in single] == [v.encode(t) for t in texts]


def test_wordpiece_pickles_and_compares_by_file():
  v = vocabularies.bbc_wordpiece()
  v.encode("build the tokenizer first")
  clone = pickle.loads(pickle.dumps(v))
  assert clone == v and hash(clone) == hash(v) and clone.encode("the cat") == v.encode("the cat")


def test_wordpiece_bert_layout(tmp_path):
  """Google's BERT vocab puts [UNK] [CLS] [SEP] [MASK] at 100..103, after [unusedN]."""
  tokens = (["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
            + ["the", "cat", "sat", ".", "un", "##able"])
  path = tmp_path / "vocab.txt"
  path.write_text("".join(t + "\n" for t in tokens))
  v = vocabularies.WordPieceVocabulary(str(path))
  assert (v.pad_id, v.unk_id, v.cls_id, v.sep_id, v.mask_id) == (0, 100, 101, 102, 103)
  np.testing.assert_array_equal(v.special_ids, np.arange(104))
  assert v.encode("The cat sat. Unable dog") == [104, 105, 106, 107, 108, 109, 100]
  assert v.decode(v.encode("The cat sat. Unable")) == "the cat sat. unable"
  assert v != vocabularies.bbc_wordpiece()


def test_sentencepiece():
  v = vocabularies.bbc_sentencepiece()
  assert (v.pad_id, v.eos_id, v.unk_id, v.vocab_size) == (0, 1, 2, 8100)
  assert v.encode("<extra_id_0>") == [8099] and v.encode("<extra_id_99>") == [8000]
  for sentence in _bbc_sentences(r".+") + ["Food & drink @ £5 [sic]"]:
    ids = v.encode(sentence)
    assert v.unk_id not in ids and v.decode(ids) == sentence
  assert vocabularies.bbc_sentencepiece(0).vocab_size == 8000
