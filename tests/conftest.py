"""8 fake CPU devices for sharding tests; must run before jax is imported anywhere.

No persistent compilation cache: reading a cached CPU executable back segfaulted the suite in
CI (jax's `compilation_cache.get_executable_and_time`, exit 139, twice at the same point).
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Tests call config.configure directly; like the CLI, they register gin's configurables (and
# the SeqIO tasks) first. After the environment above: this imports JAX.
from pretrain_jax import registry  # noqa: E402,F401

import gc  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
  """Drops each module's compiled executables and traces when it ends.

  Run as one process, the whole suite segfaulted inside XLA's CPU compiler at the same test
  (test_train_state's first, ~390 tests in; in CI twice and here once) though that module
  passes alone. The root cause is not known: memory maps stayed ~2,200 (far below
  `vm.max_map_count`). With the caches cleared per module the full suite passed.
  """
  yield
  jax.clear_caches()
  gc.collect()
