"""`import-bert` (models/bert_import.py): a Hugging Face BERT directory as a run of ours, checked
against BERT's equations written out in numpy on Hugging Face's layout, and against
transformers itself where it is installed (the `hf` extra); `with_wordpiece` re-registers a
task over the imported vocabulary."""

import json
import math
import os

import gin
import jax.numpy as jnp
import numpy as np
import pytest
import seqio

from pretrain_jax import config
from pretrain_jax.data import corpora, tasks, vocabularies
from pretrain_jax.errors import UserError
from pretrain_jax.inference import loading
from pretrain_jax.models import bert_import

D, H, F, LAYERS, VOCAB, POSITIONS = 16, 2, 32, 2, 48, 16
TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]
HF_CONFIG = {"model_type": "bert", "hidden_act": "gelu", "position_embedding_type": "absolute",
             "vocab_size": VOCAB, "hidden_size": D, "num_hidden_layers": LAYERS,
             "num_attention_heads": H, "intermediate_size": F, "max_position_embeddings": POSITIONS,
             "type_vocab_size": 2, "layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1,
             "attention_probs_dropout_prob": 0.1}


def _hf_weights(seed=0, prefix="bert.", heads=True) -> dict[str, np.ndarray]:
  """Random weights under BertForPreTraining's names (torch Linear: W is [out, in])."""
  rng = np.random.default_rng(seed)
  w = {}

  def linear(name, n_in, n_out):
    w[f"{name}.weight"] = rng.normal(0, 0.3, (n_out, n_in)).astype(np.float32)
    w[f"{name}.bias"] = rng.normal(0, 0.1, (n_out,)).astype(np.float32)

  def norm(name):
    w[f"{name}.weight"] = (1 + rng.normal(0, 0.1, (D,))).astype(np.float32)
    w[f"{name}.bias"] = rng.normal(0, 0.1, (D,)).astype(np.float32)

  for name, rows in (("word", VOCAB), ("position", POSITIONS), ("token_type", 2)):
    w[f"embeddings.{name}_embeddings.weight"] = rng.normal(0, 0.5, (rows, D)).astype(np.float32)
  norm("embeddings.LayerNorm")
  for i in range(LAYERS):
    p = f"encoder.layer.{i}."
    for proj in ("query", "key", "value"):
      linear(p + f"attention.self.{proj}", D, D)
    linear(p + "attention.output.dense", D, D)
    norm(p + "attention.output.LayerNorm")
    linear(p + "intermediate.dense", D, F)
    linear(p + "output.dense", F, D)
    norm(p + "output.LayerNorm")
  linear("pooler.dense", D, D)
  w = {prefix + k: v for k, v in w.items()}
  if heads:
    linear("cls.predictions.transform.dense", D, D)
    norm("cls.predictions.transform.LayerNorm")
    w["cls.predictions.bias"] = rng.normal(0, 0.1, (VOCAB,)).astype(np.float32)
    linear("cls.seq_relationship", D, 2)
  return w


def _write_hf_dir(path, weights, hf_config=HF_CONFIG):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  save_file(weights, os.path.join(path, "model.safetensors"))
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f)
  with open(os.path.join(path, "vocab.txt"), "w") as f:
    f.write("\n".join(TOKENS) + "\n")
  return str(path)


def _reference(w, ids_BL, types_BL, prefix="bert."):
  """BERT (Devlin et al.) over Hugging Face's names, in numpy: hidden states, pooled, MLM and
  NSP logits. Padding (id 0) is masked out of the keys, as attention_mask = ids > 0."""
  g = lambda k: w[prefix + k] if prefix + k in w else w[k]
  ln = lambda x, n: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-12) \
      * g(n + ".weight") + g(n + ".bias")
  dense = lambda x, n: x @ g(n + ".weight").T + g(n + ".bias")
  gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
  b, length = ids_BL.shape
  x = (g("embeddings.word_embeddings.weight")[ids_BL]
       + g("embeddings.position_embeddings.weight")[np.arange(length)][None]
       + g("embeddings.token_type_embeddings.weight")[types_BL])
  x = ln(x, "embeddings.LayerNorm")
  key_bias = np.where(ids_BL > 0, 0.0, -1e9)[:, None, None, :]
  heads = lambda t: t.reshape(b, length, H, D // H).transpose(0, 2, 1, 3)
  for i in range(LAYERS):
    p = f"encoder.layer.{i}."
    q, k, v = (heads(dense(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D // H) + key_bias
    s = np.exp(s - s.max(-1, keepdims=True))
    ctx = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, length, D)
    x = ln(x + dense(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
    x = ln(x + dense(gelu(dense(x, p + "intermediate.dense")), p + "output.dense"),
           p + "output.LayerNorm")
  pooled = np.tanh(dense(x[:, 0], "pooler.dense"))
  t = ln(gelu(dense(x, "cls.predictions.transform.dense")), "cls.predictions.transform.LayerNorm")
  mlm = t @ g("embeddings.word_embeddings.weight").T + w["cls.predictions.bias"]
  return x, pooled, mlm, dense(pooled, "cls.seq_relationship")


IDS = np.array([[2, 7, 9, 11, 3, 13, 14, 3], [2, 20, 21, 3, 0, 0, 0, 0]])
TYPES = np.array([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0, 0, 0]])


def _ours(out_dir):
  gin.clear_config()
  config.configure([os.path.join(out_dir, "config.gin")], [])
  model, _, step = loading.load(out_dir)
  h = model.encode(jnp.asarray(IDS), jnp.asarray(TYPES))
  return step, (np.asarray(h), np.asarray(jnp.tanh(model.pooler(h[:, 0]))),
                np.asarray(model.mlm_logits(h)), np.asarray(model.nsp_logits(h)))


def test_import_bert_equals_berts_equations_on_the_hugging_face_layout(tmp_path):
  weights = _hf_weights()
  hf_dir = _write_hf_dir(tmp_path / "hf", weights)
  result = bert_import.import_bert(hf_dir, str(tmp_path / "run"))
  assert result["fresh"] == [] and result["config"]["hidden"] == D
  step, ours = _ours(str(tmp_path / "run"))
  assert step == 0
  real = IDS > 0  # padded positions' hidden states are not compared
  for name, a, b in zip(("hidden", "pooled", "mlm", "nsp"), ours, _reference(weights, IDS, TYPES)):
    a, b = (a[real], b[real]) if a.ndim == 3 else (a, b)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=name)
  with open(tmp_path / "run" / "vocab.txt") as f:
    assert f.read().split() == TOKENS


def test_a_bert_model_without_pretraining_heads_imports_its_encoder_and_says_what_is_fresh(
    tmp_path):
  weights = _hf_weights(seed=1, prefix="", heads=False)  # a BertModel, as sentence encoders ship
  result = bert_import.import_bert(_write_hf_dir(tmp_path / "hf", weights), str(tmp_path / "run"))
  assert result["fresh"] == ["mlm_transform/kernel", "mlm_transform/bias", "mlm_norm/scale",
                             "mlm_norm/bias", "mlm_bias", "nsp/kernel", "nsp/bias"]
  _, (hidden, pooled, _, _) = _ours(str(tmp_path / "run"))
  full = {**weights, **{k: v for k, v in _hf_weights(seed=1).items() if k.startswith("cls.")}}
  ref_hidden, ref_pooled, _, _ = _reference(full, IDS, TYPES, prefix="")
  np.testing.assert_allclose(hidden[IDS > 0], ref_hidden[IDS > 0], rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-4, atol=1e-4)


def test_import_bert_matches_transformers(tmp_path):
  """Where transformers is installed: its BertForPreTraining (random, saved as safetensors)
  and our import give the same hidden states, MLM and NSP logits."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  torch.manual_seed(0)
  hf_config = transformers.BertConfig(**{k: v for k, v in HF_CONFIG.items() if k != "model_type"})
  reference = transformers.BertForPreTraining(hf_config).eval()
  reference.save_pretrained(tmp_path / "hf", safe_serialization=True)
  with open(tmp_path / "hf" / "vocab.txt", "w") as f:
    f.write("\n".join(TOKENS) + "\n")
  bert_import.import_bert(str(tmp_path / "hf"), str(tmp_path / "run"))
  _, (hidden, _, mlm, nsp) = _ours(str(tmp_path / "run"))
  with torch.no_grad():
    out = reference(torch.tensor(IDS), attention_mask=torch.tensor(IDS > 0),
                    token_type_ids=torch.tensor(TYPES), output_hidden_states=True)
  real = IDS > 0
  np.testing.assert_allclose(hidden[real], out.hidden_states[-1].numpy()[real], atol=1e-4)
  np.testing.assert_allclose(mlm[real], out.prediction_logits.numpy()[real], atol=1e-4)
  np.testing.assert_allclose(nsp, out.seq_relationship_logits.numpy(), atol=1e-4)


def test_import_bert_bad_input(tmp_path):
  with pytest.raises(UserError, match=r"no .*/nothing/config.json \(expected a Hugging Face BERT"):
    bert_import.import_bert(str(tmp_path / "nothing"), str(tmp_path / "run"))
  hf_dir = _write_hf_dir(tmp_path / "gpt", _hf_weights(), {**HF_CONFIG, "model_type": "gpt2"})
  with pytest.raises(UserError, match="model_type='gpt2'; only 'bert' maps onto models/bert.py"):
    bert_import.import_bert(hf_dir, str(tmp_path / "run"))
  hf_dir = _write_hf_dir(tmp_path / "deep", _hf_weights(), {**HF_CONFIG, "num_hidden_layers": 3})
  with pytest.raises(UserError, match="has no 'encoder.layer.2.attention.output.dense.weight'; "
                                      "it is not a BERT of 3 layers"):
    bert_import.import_bert(hf_dir, str(tmp_path / "run"))
  hf_dir = _write_hf_dir(tmp_path / "ok", _hf_weights())
  bert_import.import_bert(hf_dir, str(tmp_path / "run"))
  listing = sorted(os.listdir(tmp_path / "run" / "checkpoints"))
  with pytest.raises(UserError, match="already holds checkpoints; choose a new --out_dir"):
    bert_import.import_bert(hf_dir, str(tmp_path / "run"))
  assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == listing


def test_with_wordpiece_reregisters_a_task_over_another_vocabulary(tmp_path):
  vocab_file = tmp_path / "vocab.txt"
  tokens = vocabularies.bbc_wordpiece().tokens[:4000]  # a different vocabulary: a prefix of it
  vocab_file.write_text("\n".join(tokens) + "\n")
  name = tasks.with_wordpiece("bbc_topic_bert", str(vocab_file))
  assert name.startswith("bbc_topic_bert_wp") and tasks.with_wordpiece(
      "bbc_topic_bert", str(vocab_file)) == name
  small = vocabularies.WordPieceVocabulary(str(vocab_file))
  row = next(seqio.get_dataset(name, {"inputs": 32, "targets": 32}, tasks.feature_converter(name),
                               dataset_split="validation", shuffle=False).as_numpy_iterator())
  first = corpora.bbc_articles("validation")[0]
  assert row["input_ids"][1:31].tolist() == small.encode(first["text"])[:30]
  assert row["label"] == first["label"] and max(row["input_ids"]) < 4000
  with pytest.raises(UserError, match=r"with_wordpiece.vocab_file='/no/such/vocab.txt': no such"):
    tasks.with_wordpiece("bbc_topic_bert", "/no/such/vocab.txt")
  with pytest.raises(UserError, match="with_wordpiece.task='bbc_topic' has no WordPiece feature"):
    tasks.with_wordpiece("bbc_topic", str(vocab_file))
