"""One jitted, sharded train step for any model and loss; the loop around it.

The trainer knows neither the family nor the objective: gin hands it a model factory, a loss
`loss_fn(model, batch, rngs) -> (loss, {name: (numerator, denominator)})`, a SeqIO task and its
feature converter. State is a plain pytree `TrainState(step, params, opt_state, model_state)`
(train_state.py) whose every leaf is sharded by the logical axes its Variable was declared with.
The optimizer sees only the parameters the freeze filter leaves trainable; the model's AuxLoss
terms join the loss after the forward pass.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from tqdm import tqdm

from pretrain_jax import config, peft
from pretrain_jax.data import pipeline
from pretrain_jax.errors import UserError
from pretrain_jax.models import protocol
from pretrain_jax.objectives import classification
from pretrain_jax.peft import delta as delta_lib
from pretrain_jax.training import checkpoints, metrics as metrics_lib, optimizers, partitioning
from pretrain_jax.training import preemption as preemption_lib, train_state
from pretrain_jax.training.train_state import TrainState


def _init_fn(model_factory: Callable[[int], nnx.Module], seed: int, tx,
            freeze: train_state.FreezeFilter) -> Callable[[], TrainState]:
  """The state a run starts from: moments only for the trainable parameters."""
  def init() -> TrainState:
    _, params, _, model_state = train_state.split(model_factory(seed))
    trainable, _ = freeze.partition(params)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(trainable), model_state)
  return init


PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


@gin.configurable
def dropout_key(seed: int, impl: str = "threefry2x32") -> jax.Array:
  """The root of every step's dropout key (folded with the step, then the layer).

  'rbg' and 'unsafe_rbg' draw bits with XLA's RngBitGenerator instead of threefry's hash
  rounds, which cost more than the matmuls they mask on CPU and TPU (large JAX trainers use
  them for dropout); masks differ from threefry's, their statistics do not. 'unsafe_rbg' also
  splits and folds by a cheaper, statistically weaker rule.
  """
  if impl not in PRNG_IMPLS:
    raise UserError(f"dropout_key.impl={impl!r}; valid: {PRNG_IMPLS}")
  return jax.random.key(seed, impl=impl)


class Setup:
  """Mesh, model graph, optimizer, shardings and the jitted step/eval functions."""

  def __init__(self, model_factory: Callable[[int], nnx.Module], loss_fn, num_steps: int,
               num_microbatches: int = 1, seed: int = 0, mesh=None):
    """`mesh` defaults to gin's `make_mesh()` over the local devices; pass one over a TPU
    topology's devices to compile the step ahead of time for hardware that is not here."""
    self.mesh = partitioning.make_mesh() if mesh is None else mesh
    self.rules = partitioning.logical_axis_rules()
    self.loss_fn, self.num_microbatches = loss_fn, num_microbatches
    self.tx, self.schedule = optimizers.make_optimizer(num_steps)
    finetune = peft.finetune()
    model_factory = finetune.wrap(model_factory)
    self.model = train_state.AbstractModel.build(model_factory, seed)
    self.graphdef = self.model.graphdef
    self.freeze = finetune.freeze_filter(self.model.module, train_state.trainable_params())
    self.num_classes = getattr(self.model.module, "num_classes", None)
    self.freeze.check(self.model.params)
    is_model = isinstance(self.model.module, protocol.Model)
    self.flops_per_token = self.model.module.train_flops_per_token if is_model else None
    self.model_config = self.model.module.cfg if is_model else None
    init = _init_fn(model_factory, seed, self.tx, self.freeze)
    self.abstract_state = jax.eval_shape(init)
    self.shardings = partitioning.tree_shardings(self.abstract_state, self.mesh, self.rules)
    self._init = jax.jit(init, out_shardings=self.shardings)
    self.dropout_key = dropout_key(seed + 1)
    self._step = jax.jit(self._train_step, out_shardings=(self.shardings, None),
                         donate_argnums=0)
    self._eval = jax.jit(self._eval_step)

  def context(self):
    """Mesh and activation rules active while tracing."""
    return partitioning.context(self.mesh, self.rules)

  def init_state(self) -> TrainState:
    with self.context():
      return self._init()

  def abstract_with_shardings(self):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        self.abstract_state, self.shardings)

  def compile_step(self, batch):
    """The train step compiled ahead of time for `batch` (device arrays or ShapeDtypeStructs)
    and the abstract state: its HLO (`as_text()`), `cost_analysis()` and memory analysis."""
    with self.context():
      return self._step.lower(self.abstract_with_shardings(), batch).compile()

  def batch_to_device(self, batch):
    if self.num_classes and "label" in batch and isinstance(batch["label"], np.ndarray):
      classification.check_labels(batch["label"], self.num_classes)
    return pipeline.to_global(batch, lambda ndim: partitioning.batch_sharding(self.mesh, ndim))

  def _forward(self, params, model_state, batch, rngs):
    """(loss + the model's AuxLoss terms, (metrics, the model state after the forward))."""
    model = train_state.merge(self.graphdef, params, train_state.zeros_like(self.model.aux),
                              model_state)
    rows = (peft.bank_index(batch["bank_index"]) if "bank_index" in batch
            else contextlib.nullcontext())  # each row its own tuned model (peft banks)
    with rows:
      loss, metrics = self.loss_fn(model, batch, rngs=rngs)
    aux_loss, aux_metrics = train_state.aux_terms(model)
    if aux_loss is not None:
      loss = loss + aux_loss
      if "loss" in metrics:  # the logged loss stays the optimised one, with its own weighting
        num, den = metrics["loss"]
        metrics = {**metrics, "loss": (num + aux_loss * den, den)}
    new_state = jax.lax.stop_gradient(nnx.state(model, train_state.MODEL_STATE))
    return loss, ({**metrics, **aux_metrics}, new_state)

  def _loss(self, trainable, frozen, model_state, batch, key):
    return self._forward(nnx.merge_state(trainable, frozen), model_state, batch,
                         nnx.Rngs(dropout=key))

  def _train_step(self, state: TrainState, batch):
    key = jax.random.fold_in(self.dropout_key, state.step)
    trainable, frozen = self.freeze.partition(state.params)
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    if self.num_microbatches == 1:
      (_, (metrics, model_state)), grads = grad_fn(trainable, frozen, state.model_state, batch,
                                                   key)
    else:  # microbatches run in order: each sees the model state the previous one left
      micro = jax.tree.map(
          lambda x: x.reshape(self.num_microbatches, -1, *x.shape[1:]), batch)

      def accumulate(carry, inputs):
        i, mb = inputs
        grads, metrics, model_state = carry
        (_, (m, model_state)), g = grad_fn(trainable, frozen, model_state, mb,
                                           jax.random.fold_in(key, i))
        return (*jax.tree.map(jnp.add, (grads, metrics), (g, m)), model_state), None

      metric_shapes = jax.eval_shape(self._loss, trainable, frozen, state.model_state,
                                     jax.tree.map(lambda x: x[0], micro), key)[1][0]
      zeros = (jax.tree.map(jnp.zeros_like, trainable),
               jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metric_shapes),
               state.model_state)
      (grads, metrics, model_state), _ = jax.lax.scan(
          accumulate, zeros, (jnp.arange(self.num_microbatches), micro))
      grads = jax.tree.map(lambda g: g / self.num_microbatches, grads)
    updates, opt_state = self.tx.update(grads, state.opt_state, trainable)
    params = nnx.merge_state(optax.apply_updates(trainable, updates), frozen)
    metrics = {**metrics, "grad_norm": (optax.tree.norm(grads), jnp.float32(1.0)),
               "learning_rate": (jnp.asarray(self.schedule(state.step), jnp.float32),
                                 jnp.float32(1.0))}
    return TrainState(state.step + 1, params, opt_state, model_state), metrics

  def _eval_step(self, params, model_state, batch):
    """Metrics only: an eval forward pass leaves the model state as it was."""
    return self._forward(params, model_state, batch, rngs=None)[1][0]

  def all_finite(self, state: TrainState) -> bool:
    """Checked before every save, so no checkpoint ever holds NaN or inf parameters (or
    model state)."""
    return bool(self._all_finite((state.params, state.model_state)))

  @staticmethod
  @jax.jit
  def _all_finite(tree):
    checks = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]  # counters and keys cannot be NaN
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)

  def train_step(self, state, batch):
    with self.context():
      return self._step(state, self.batch_to_device(batch))

  def evaluate(self, state, batches) -> dict[str, float]:
    with self.context():
      return metrics_lib.reduce([self._eval(state.params, state.model_state,
                                            self.batch_to_device(b)) for b in batches])


def _all_hosts_positions(position: dict) -> dict:
  """Every host's data position (hosts reading their own source shard drift apart)."""
  if jax.process_count() == 1:
    return position
  keys = sorted(position)
  rows = multihost_utils.process_allgather(np.array([position[k] for k in keys]))
  return {**position, "hosts": [dict(zip(keys, map(int, row))) for row in rows]}


def _this_hosts_position(saved: dict) -> dict:
  hosts = saved.get("hosts")
  return saved if hosts is None else hosts[jax.process_index()]


# What a resume must not change: each would silently alter which examples come next.
_RUN_IDENTITY = {"task": "train.task", "batch_size": "train.batch_size", "seed": "train.seed",
                 "hosts": "the number of hosts (each reads its own shard of the data)"}


def _check_resume(model_dir: str, saved: dict, now: dict, step: int, schedule) -> None:
  """Refuses a resume that would corrupt the data position; says what a new num_steps does to
  the learning-rate schedule. `saved`: the identity in the checkpoint (absent in old ones)."""
  for key, name in _RUN_IDENTITY.items():
    if key in saved and saved[key] != now[key]:
      raise UserError(f"{model_dir} was trained with {name} = {saved[key]!r}, this run has "
                      f"{now[key]!r}: resuming would change which examples come next; use "
                      f"{saved[key]!r} or a fresh --model_dir")
  before = saved.get("num_steps")
  if before is not None and before != now["num_steps"] and step < now["num_steps"]:
    old_rate = optimizers.make_optimizer(before)[1](step)
    print(f"train.num_steps changed from {before} to {now['num_steps']}: the learning-rate "
          f"schedule is laid out over {now['num_steps']} steps from here on (at step {step} "
          f"the rate goes from {float(old_rate):.3g} to {float(schedule(step)):.3g})")


def _make_model_dir(model_dir: str) -> None:
  if "://" in model_dir:
    return
  if os.path.exists(model_dir) and not os.path.isdir(model_dir):
    raise UserError(f"--model_dir {model_dir} is a file; give a directory (new or a run's)")
  try:
    os.makedirs(model_dir, exist_ok=True)
  except OSError as e:
    raise UserError(f"--model_dir {model_dir} cannot be created: {e.strerror}") from e
  if not os.access(model_dir, os.W_OK | os.X_OK):
    raise UserError(f"--model_dir {model_dir} is not writable; give a directory you can write")


def _absolute(path: str) -> str:
  """Orbax wants absolute paths; remote ones (gs://...) already are."""
  return path if "://" in path else os.path.abspath(path)


def _check_vocabulary(task: str, setup: Setup) -> None:
  """Ids past the embedding table would be clamped silently by the gather: refuse them."""
  import seqio  # pylint: disable=import-outside-toplevel
  model_vocab = getattr(setup.model_config, "vocab_size", None)
  if model_vocab is None or task not in seqio.TaskRegistry.names():
    return
  for name, feature in seqio.get_mixture_or_task(task).output_features.items():
    if feature.vocabulary.vocab_size > model_vocab:
      raise UserError(f"task {task!r} feature {name!r} has a vocabulary of "
                      f"{feature.vocabulary.vocab_size} tokens but the model's vocab_size is "
                      f"{model_vocab}; set the model's vocab_size >= "
                      f"{feature.vocabulary.vocab_size}")


def _initialise_from(setup: Setup, state: TrainState, init_from: str):
  """Parameters and model state from another run where their paths exist there; the fresh
  initialisation elsewhere. The optimizer state starts fresh. Returns (state, the run's step,
  the parameter paths it lacked)."""
  source = checkpoints.Checkpointer(os.path.join(_absolute(init_from), "checkpoints"),
                                    read_only=True)
  abstract = setup.abstract_with_shardings()
  base_step = source.latest_step()
  try:
    restored, new = source.restore_by_path(
        {"params": abstract.params, "model_state": abstract.model_state},
        fallback={"params": state.params, "model_state": state.model_state})
  finally:
    source.close()
  count = len(jax.tree.leaves(restored)) - len(new)
  print(f"Initialised {count} arrays from {init_from}; newly initialised: "
        f"{', '.join(p.removeprefix('params/') for p in new) or 'none'}")
  state = TrainState(state.step, restored["params"], state.opt_state, restored["model_state"])
  return state, base_step, {p.removeprefix("params/") for p in new if p.startswith("params/")}


def _start_delta(setup: Setup, state: TrainState, init_from: str, base_step: int,
                 new: set[str], model_dir: str) -> delta_lib.Delta | None:
  """A run that starts from another and freezes some of its parameters stores only the rest
  (peft/delta.py); None when nothing is frozen."""
  trainable, frozen = setup.freeze.partition(state.params)
  if not jax.tree.leaves(frozen):
    return None
  from_base = {p: x for p, x in delta_lib.flat(frozen).items() if p not in new}
  stored = [p for p in delta_lib.flat(state.params) if p not in from_base]
  delta = delta_lib.create(_absolute(init_from), base_step, from_base, stored)
  delta.write(model_dir)
  stored_bytes = train_state.num_bytes(delta.stored_params(state.params))
  print(f"Checkpoints store a delta: {len(stored)} arrays, {stored_bytes / 2**20:.2f} MiB "
        f"(trainable {train_state.num_bytes(trainable) / 2**20:.2f} MiB); the other "
        f"{len(from_base)} come from {init_from} (fingerprint {delta.fingerprint})")
  return delta


def _restore(setup: Setup, ckpt: checkpoints.Checkpointer, delta: delta_lib.Delta | None,
             context: str):
  """(state, data position) of the latest checkpoint, a delta run's parameters composed with
  its base's; None without a checkpoint."""
  abstract = setup.abstract_with_shardings()
  if delta is None:
    return ckpt.restore(abstract)
  restored = ckpt.restore(dataclasses.replace(abstract,
                                              params=delta.stored_params(abstract.params)))
  if restored is None:
    return None
  state, position = restored
  params = delta.compose(abstract.params, delta_lib.flat(state.params), context)
  return dataclasses.replace(state, params=params), position


def _to_save(state: TrainState, delta: delta_lib.Delta | None) -> TrainState:
  return state if delta is None else dataclasses.replace(
      state, params=delta.stored_params(state.params))


def _stages(sequence_length: int | None, num_steps: int | None,
            stages: Sequence[tuple[int, int]] | None) -> list[tuple[int, int]]:
  """[(num_steps, sequence_length), ...]: BERT trains 90 % of steps at 128, then 10 % at 512."""
  if stages:
    return [(int(n), int(length)) for n, length in stages]
  if not (sequence_length and num_steps):
    raise UserError("set train.num_steps and train.sequence_length (or train.stages)")
  return [(num_steps, sequence_length)]


@gin.configurable(denylist=["model_dir"])
def train(model_dir: str, *, task: str = gin.REQUIRED, model=gin.REQUIRED,
          loss_fn=gin.REQUIRED, feature_converter=gin.REQUIRED, batch_size: int = 32,
          num_steps: int | None = None, sequence_length: int | None = None,
          stages: Sequence[tuple[int, int]] | None = None, num_microbatches: int = 1,
          log_every: int = 50, eval_every: int = 500, eval_batches: int = 10,
          eval_split: str = "validation", checkpoint_every: int = 1000,
          keep_checkpoints: int = 3, seed: int = 0, init_from: str | None = None,
          store_delta: bool = True, progress: bool = True) -> dict:
  """Trains `model` on `task` into `model_dir` (resuming from its latest checkpoint).

  `init_from`: another run's model_dir whose latest parameters start this run (finetuning);
  parameters it lacks (a new head) keep their fresh initialisation. Ignored when resuming.
  `store_delta`: when init_from is set and parameters are frozen (peft/), checkpoints hold
  only the rest, and loading reads the frozen ones from init_from (peft/delta.py).

  Returns the last logged train and eval metrics.
  """
  stage_list = _stages(sequence_length, num_steps, stages)
  total_steps = sum(n for n, _ in stage_list)
  for name, value in dict(batch_size=batch_size, log_every=log_every,
                          checkpoint_every=checkpoint_every, eval_batches=eval_batches,
                          keep_checkpoints=keep_checkpoints,
                          num_microbatches=num_microbatches, num_steps=total_steps).items():
    if not isinstance(value, int) or value < 1:
      raise UserError(f"train.{name}={value!r}; it must be a positive integer")
  if not isinstance(eval_every, int) or eval_every < 0:
    raise UserError(f"train.eval_every={eval_every!r}; it must be an integer >= 0 "
                    "(0: no evaluation)")
  if batch_size % num_microbatches:
    raise UserError(f"batch_size {batch_size} is not divisible by num_microbatches "
                    f"{num_microbatches}")
  model_dir = _absolute(model_dir)
  _make_model_dir(model_dir)
  setup = Setup(model, loss_fn, total_steps, num_microbatches, seed)
  batch_shards = setup.mesh.shape["data"] * setup.mesh.shape["fsdp"]
  if batch_size % batch_shards:
    raise UserError(f"batch size {batch_size} does not split over data x fsdp = "
                    f"{batch_shards} devices; make it a multiple of {batch_shards}")
  _check_vocabulary(task, setup)
  # the data opens (a TFDS dataset not prepared, a corpus that is not text) before anything is
  # written into model_dir: the tf.data graph is built, not iterated
  pipeline.batch_spec(task, pipeline.feature_lengths(stage_list[0][1]), feature_converter,
                      batch_size)
  trainable, frozen = setup.freeze.partition(setup.model.params)
  if jax.tree.leaves(frozen):
    print(f"Training {train_state.num_elements(trainable):,} of "
          f"{train_state.num_elements(setup.model.params):,} parameters (trainable_params: "
          f"trainable={list(setup.freeze.trainable)}, frozen={list(setup.freeze.frozen)})")
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), keep_checkpoints)
  delta = delta_lib.Delta.read(model_dir)
  identity = {"task": task, "batch_size": batch_size, "seed": seed,
              "hosts": jax.process_count(), "num_steps": total_steps}
  restored = _restore(setup, ckpt, delta, model_dir)
  if restored:
    state, saved = restored
    _check_resume(model_dir, saved.get("run", {}), identity, int(state.step), setup.schedule)
    position = _this_hosts_position(saved)
    if int(state.step) >= total_steps:
      ckpt.close()
      print(f"{model_dir} is already trained to step {int(state.step)} of {total_steps}: "
            "nothing to do (raise train.num_steps to continue)")
      return {}
    print(f"Resuming from step {int(state.step)} in {model_dir}")
  else:
    state, position = setup.init_state(), {"stage": 0, "epoch": 0, "batch": 0}
    delta = delta_lib.clear(model_dir)  # a fresh start: no stale delta.json survives
    if init_from:
      state, base_step, new = _initialise_from(setup, state, init_from)
      if store_delta:
        delta = _start_delta(setup, state, init_from, base_step, new, model_dir)
  if jax.process_index() == 0:  # only now: a refused model_dir keeps the config it was made by
    path = os.path.join(model_dir, "config.gin")
    with open(path + ".tmp", "w") as f:  # atomic: a kill mid-write leaves the old one whole
      f.write(gin.config_str())
    os.replace(path + ".tmp", path)
  writer = metrics_lib.MetricsWriter(model_dir, enabled=jax.process_index() == 0)
  # Records past the checkpoint are redone; with none (a run killed before its first
  # checkpoint), all of them, the step-0 evaluation included.
  writer.truncate_after(int(state.step) if restored else -1)
  peak = metrics_lib.peak_flops(jax.devices()[0])
  step = int(state.step)
  last = {}
  bar = tqdm(total=total_steps, initial=step, disable=not progress, unit="step",
             dynamic_ncols=True)
  preemption = preemption_lib.Preemption().install()
  stopped_at = None
  try:
    stage_start = 0
    for stage_index, (stage_steps, length) in enumerate(stage_list):
      stage_end = stage_start + stage_steps
      if step >= stage_end:
        stage_start = stage_end
        continue
      lengths = pipeline.feature_lengths(length)
      targets_len = pipeline.decoder_length(length)  # an encoder-decoder reads both
      tokens_per_row = length + (targets_len or 0)
      start = position if position.get("stage", 0) == stage_index else None
      # The stage a checkpoint resumes: its hosts' iterator states replace the replay.
      resuming = bool(restored) and start is not None and step == int(restored[0].step)
      data = pipeline.TrainBatches(
          task, lengths, feature_converter, batch_size, seed,
          position=start and {"epoch": start["epoch"], "batch": start["batch"]},
          state_dir=pipeline.iterator_state_dir(model_dir, step) if resuming else None)
      held_out = (pipeline.eval_batches(task, lengths, feature_converter, batch_size,
                                        eval_batches, eval_split) if eval_every else [])
      if held_out and step == 0:  # the starting point of the held-out curve
        writer.write(0, eval_split, setup.evaluate(state, held_out))
      window, t0, tokens = [], time.perf_counter(), 0
      while step < stage_end:
        state, step_metrics = setup.train_step(state, next(data))
        step += 1
        window.append(step_metrics)
        tokens += batch_size * tokens_per_row
        if step % log_every == 0 or step == stage_end:
          values = metrics_lib.reduce(window)
          if not np.isfinite(values["loss"]):
            raise UserError(
                f"loss is {values['loss']} at step {step}; stopping without saving this "
                f"state (last checkpoint: step {ckpt.latest_step()}). Lower the learning "
                "rate or check the data")
          elapsed = time.perf_counter() - t0
          values["tokens_per_sec"] = tokens / elapsed
          if peak and setup.flops_per_token:
            flops = setup.flops_per_token(length, targets_len)
            values["mfu"] = values["tokens_per_sec"] * flops / (peak * jax.device_count())
          writer.write(step, "train", values)
          last["train"] = values
          bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_sec']:.0f}",
                          **({"mfu": f"{values['mfu']:.1%}"} if "mfu" in values else {}))
          window, t0, tokens = [], time.perf_counter(), 0
        bar.update(1)
        paused = time.perf_counter()  # eval and checkpoint time is not training throughput
        if held_out and (step % eval_every == 0 or step == total_steps):
          last["eval"] = setup.evaluate(state, held_out)
          writer.write(step, eval_split, last["eval"])
        stop = preemption.requested()
        if step % checkpoint_every == 0 or step == total_steps or stop:
          if not setup.all_finite(state):
            raise UserError(
                f"parameters are not finite at step {step}; stopping without saving this "
                f"state (last checkpoint: step {ckpt.latest_step()}). Lower the learning "
                "rate or check the data")
          # Each host's iterator state first (synchronously, atomically), then the checkpoint
          # that refers to it; states of steps orbax no longer keeps are deleted.
          data.save_state(pipeline.iterator_state_dir(model_dir, step))
          ckpt.save(step, _to_save(state, delta),
                    {**_all_hosts_positions({"stage": stage_index, **data.position}),
                     "run": identity})
          pipeline.prune_iterator_states(model_dir, {*ckpt.manager.all_steps(), step})
        if stop:
          stopped_at = step
          break
        t0 += time.perf_counter() - paused
      if stopped_at is not None:
        break
      stage_start = stage_end
      position = {"stage": stage_index + 1, "epoch": 0, "batch": 0}
  finally:
    bar.close()
    data = None  # a live tf.data iterator can deadlock interpreter shutdown: release it now
    ckpt.wait()
    pipeline.prune_iterator_states(model_dir, ckpt.manager.all_steps())
    ckpt.close()
    preemption.uninstall()  # only now: a first notice during the last write lets it finish
  if jax.process_index() == 0:
    print(_summary(last, metrics_lib.plot(model_dir)))
    if stopped_at is not None:
      print(f"Stopped by {preemption.received or 'another host'} at step {stopped_at} of "
            f"{total_steps}, with a checkpoint there; the same command resumes the run")
  return last


def _summary(last: dict, plot_path: str | None) -> str:
  lines = []
  for split, values in last.items():
    shown = {k: v for k, v in values.items() if k not in ("learning_rate", "grad_norm")}
    lines.append(f"{split:>6}: " + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()))
  if plot_path:
    lines.append(f"curves: {plot_path}")
  return "\n".join(lines)


def evaluate_checkpoint(model_dir: str, split: str = "validation") -> dict:
  """Evaluates the latest checkpoint in `model_dir` with the train bindings of the gin config."""
  q = lambda name, default=None: config.bound(f"train.{name}", default)
  model_dir = _absolute(model_dir)
  stage_list = _stages(q("sequence_length"), q("num_steps"), q("stages"))
  setup = Setup(q("model"), q("loss_fn"), sum(n for n, _ in stage_list),
                seed=q("seed", 0))
  ckpt = checkpoints.Checkpointer(os.path.join(model_dir, "checkpoints"), read_only=True)
  try:
    restored = _restore(setup, ckpt, delta_lib.Delta.read(model_dir), model_dir)
  finally:
    ckpt.close()
  if restored is None:
    raise UserError(f"no checkpoint in {model_dir}/checkpoints")
  state, _ = restored
  length = stage_list[-1][1]
  batches = pipeline.eval_batches(q("task"), pipeline.feature_lengths(length),
                                  q("feature_converter"), q("batch_size", 32),
                                  q("eval_batches", 10), split)
  return {"step": int(state.step), "split": split, **setup.evaluate(state, batches)}
