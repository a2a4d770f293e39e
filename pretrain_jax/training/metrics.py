"""Metrics: (numerator, denominator) sums reduced per window, to metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from pretrain_jax.errors import UserError

# Peak dense bf16 FLOP/s per chip by jax device_kind prefix, for MFU.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU v3": 123e12,
    "TPU v2": 45e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12,
}


def peak_flops(device: jax.Device) -> float | None:
  """Peak FLOP/s of one JAX device: on TPU v2 and v3 a device is one of a chip's two cores."""
  kind = device.device_kind
  for prefix in sorted(PEAK_FLOPS, key=len, reverse=True):
    if kind.startswith(prefix):
      return PEAK_FLOPS[prefix] / (2 if kind in ("TPU v2", "TPU v3") else 1)
  return None


def reduce(metric_sums: list[dict]) -> dict[str, float]:
  """Sums numerators and denominators over steps, then divides: exact means over tokens."""
  host = jax.device_get(metric_sums)
  out = {}
  for name in host[0]:
    num = sum(float(m[name][0]) for m in host)
    den = sum(float(m[name][1]) for m in host)
    out[name] = num / den if den else float("nan")
  if "log_perplexity" in out:  # a language model's token-mean cross-entropy, in nats
    out["perplexity"] = float(np.exp(out.pop("log_perplexity")))
  return out


class MetricsWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard."""

  def __init__(self, model_dir: str, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(model_dir, "metrics.jsonl")
    self._tb = {}
    self._model_dir = model_dir

  def truncate_after(self, step: int) -> None:
    """On resume: drop records of steps past the checkpoint (they are about to be redone) and
    a torn last line; the file is replaced atomically, so a kill here loses nothing."""
    if self.enabled and os.path.exists(self.path):
      kept = [r for r in read(os.path.dirname(self.path)) if r["step"] <= step]
      tmp = self.path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
      os.replace(tmp, self.path)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split,
              **{k: (None if v is None or not np.isfinite(v) else float(v))
                 for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    import tensorflow as tf  # the TensorBoard writer; imported late to keep start-up light
    if split not in self._tb:
      self._tb[split] = tf.summary.create_file_writer(os.path.join(self._model_dir, "tb", split))
    with self._tb[split].as_default(step=int(step)):
      for k, v in values.items():
        if v is not None and np.isfinite(v):
          tf.summary.scalar(k, v)
    self._tb[split].flush()


def read(model_dir: str) -> list[dict]:
  """The records of MODEL_DIR/metrics.jsonl. A last line with no newline that does not parse
  (the process died writing it) is skipped; a bad line anywhere else is an error."""
  path = os.path.join(model_dir, "metrics.jsonl")
  with open(path) as f:
    lines = f.read().split("\n")
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # torn: the write of this line never finished
        continue
      raise UserError(f"{path}:{number} is not a JSON record ({e.msg}): {line[:80]!r}") from e
  return records


def plot(model_dir: str, keys: tuple[str, ...] = ("loss", "perplexity", "accuracy", "mlm_accuracy",
                                                  "nsp_accuracy", "learning_rate")) -> str | None:
  """Writes MODEL_DIR/metrics.png: train and held-out curves of the logged metrics."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  records = read(model_dir)
  keys = [k for k in keys if any(r.get(k) is not None for r in records)]
  if not keys:
    return None
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
  for ax, key in zip(axes[0], keys):
    for split in sorted({r["split"] for r in records}):
      points = [(r["step"], r[key]) for r in records if r["split"] == split and
                r.get(key) is not None]
      if points:
        ax.plot(*zip(*points), marker="o" if split != "train" else None, ms=3, label=split)
    ax.set_title(key)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  path = os.path.join(model_dir, "metrics.png")
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path
