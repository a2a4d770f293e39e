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
