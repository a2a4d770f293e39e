"""Imports every module that registers gin configurables or SeqIO tasks."""
# pylint: disable=unused-import
from pretrain_jax.data import pipeline, tasks
from pretrain_jax.data import glue  # finetuning tasks, BertClassificationFeatureConverter
from pretrain_jax.layers import fp8
from pretrain_jax.models import bert, deepseek, gpt, t5
from pretrain_jax.objectives import causal_lm, classification, masked_lm
from pretrain_jax.training import optimizers, partitioning, trainer
from pretrain_jax.peft import adapters, lora, prefix
