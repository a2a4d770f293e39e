"""Building blocks shared by every architecture; parameters carry logical axis names."""
from flax import nnx

# Our parameters carry *logical* axis names ('embed', 'mlp'), mapped to the mesh by
# training.partitioning. Flax's eager sharding would read them as mesh axes at creation.
nnx.use_eager_sharding(False)
