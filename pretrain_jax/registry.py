"""Imports every module that registers gin configurables or SeqIO tasks."""
# pylint: disable=unused-import
from pretrain_jax.data import tasks
from pretrain_jax.models import bert
from pretrain_jax.objectives import masked_lm
from pretrain_jax.training import optimizers, partitioning, trainer
