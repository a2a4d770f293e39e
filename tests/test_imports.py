"""What importing costs: config pulls in no JAX, models or data; tasks read no corpus."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_imports_nothing_heavy_and_tasks_read_no_corpus():
  code = textwrap.dedent("""
      import sys
      from pretrain_jax import config
      config.configure([], [])  # parsing gin used to import every registration
      try:
        config.configure([], ["train.num_steps = 1"])
        raise AssertionError("train.num_steps parsed with nothing registered")
      except config.UserError as e:
        assert "import pretrain_jax.registry" in str(e), e
      ours = tuple(f"pretrain_jax.{p}" for p in
                   ("models", "layers", "training", "objectives", "inference", "data"))
      heavy = sorted(m for m in sys.modules
                     if m.startswith(ours) or m.split(".")[0] in ("jax", "flax"))
      assert not heavy, f"pretrain_jax.config imported {heavy}"
      from pretrain_jax.data import corpora, tasks
      assert "bbc_span_corruption" in tasks.seqio.TaskRegistry.names()
      read = corpora._all_bbc_articles.cache_info().currsize
      assert not read, "registering the tasks read the BBC corpus"
      """)
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
  run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                       text=True)
  assert run.returncode == 0, run.stderr[-3000:]
