"""The training loop: one jitted step over a device mesh, eval, metrics, checkpoints.

``train_and_evaluate(config, workdir)`` is what ``python -m irnet_jax.main`` runs.
Sections, top to bottom: optimizer and schedules, EDE from the step counter, the
jitted train/eval steps, host-side helpers (metrics, fingerprint), the loop in named
phases: :func:`prepare` (validate, resolve, check the workdir's run), :func:`build`,
:func:`restore`, :class:`_Loop` and :func:`final_report`.

Design (see the README): ``graphdef, state = nnx.split((model, optimizer))`` once;
``train_step(state, batch) -> (state, metrics)`` is pure, jitted with the batch
sharded over the mesh's ``data`` axis and the state replicated (BN statistics are
therefore over the global batch) and donated. EDE's (t, k) come from the optimizer's
step counter inside the step: one compilation for the whole run. Every random draw
is a function of (seed, step), so a resumed run is the same run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from irnet_jax import checkpointing, data, diagnostics, kernels, ops
from irnet_jax import config as config_lib
from irnet_jax.data import device as data_device

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ optimizer


def learning_rate_schedule(c: ml_collections.ConfigDict, steps_per_epoch: int,
                           total_steps: int) -> optax.Schedule:
  """optax schedule of ``c.optimizer.schedule`` as a function of the step."""
  o = c.optimizer
  lr = o.learning_rate
  if o.schedule == "constant":
    return optax.constant_schedule(lr)
  if o.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(total_steps, 1))
  if o.schedule == "cosine_epoch":
    # torch CosineAnnealingLR(T_max=epochs) stepped once per epoch, as the official code.
    num_epochs = max(1, math.ceil(total_steps / steps_per_epoch))
    per_epoch = optax.cosine_decay_schedule(lr, num_epochs)
    return lambda step: per_epoch(step // steps_per_epoch)
  # "warmup_multistep": the official ImageNet recipe (linear warm-up, then x0.1 steps).
  warmup = optax.linear_schedule(o.warmup_init_lr, lr, max(o.warmup_steps, 1))
  boundaries = {int(f * total_steps) - o.warmup_steps: o.decay_factor
                for f in o.decay_fractions}
  decay = optax.piecewise_constant_schedule(lr, boundaries)
  return optax.join_schedules([warmup, decay], [o.warmup_steps])


def make_optimizer(c: ml_collections.ConfigDict, schedule: optax.Schedule
                   ) -> optax.GradientTransformation:
  """SGD / Nesterov / Adam with torch-style L2 weight decay (added to the gradient)."""
  o = c.optimizer
  if o.name == "adam":
    opt = optax.adam(schedule)
  else:
    opt = optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.name == "nesterov")
  if o.weight_decay:
    opt = optax.chain(optax.add_decayed_weights(o.weight_decay), opt)
  return opt


# ------------------------------------------------------------------ EDE


def ede_at(c: ml_collections.ConfigDict, step: jax.Array, steps_per_epoch: int,
           total_steps: int) -> ops.EDE:
  """EDE (t, k) for a (traced) step: per epoch like the official CIFAR code, or every
  ``ede.every_steps`` steps by progress like the official ImageNet code."""
  step = step.astype(jnp.float32)
  if c.ede.schedule_by == "epoch":
    num_epochs = max(1, math.ceil(total_steps / steps_per_epoch))
    progress = jnp.floor(step / steps_per_epoch) / num_epochs
  else:
    every = c.ede.every_steps
    progress = jnp.floor(step / every) * every / max(total_steps, 1)
  return ops.ede_schedule(jnp.minimum(progress, 1.0), c.ede.t_min, c.ede.t_max)


# ------------------------------------------------------------------ steps


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32; logits (N, C), labels (N,) int."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def make_train_step(graphdef: nnx.GraphDef, c: ml_collections.ConfigDict,
                    schedule: optax.Schedule, steps_per_epoch: int, total_steps: int
                    ) -> Callable[[nnx.State, dict], tuple[nnx.State, dict]]:
  """``step(state, batch) -> (state, metrics)``: pure, for ``jax.jit``.

  ``batch["image"]`` is uint8 NHWC from the input pipeline (normalized, and
  colour-jittered when ``dataset.color_jitter_on="device"``, here) or already
  normalized floats (used as they are).
  """
  device_jitter = data.color_jitter_on(c.dataset) == "device"

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    step = optimizer.step[...]
    ede = ede_at(c, step, steps_per_epoch, total_steps)
    jitter = data_device.jitter_key(c.seed, step) if device_jitter else None
    images = data_device.model_input(batch["image"], c.dataset.mean, c.dataset.std,
                                     jitter)

    def loss_fn(m):
      logits = m(images, ede=ede)
      return cross_entropy(logits, batch["label"]).mean(), logits

    (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    optimizer.update(model, grads)
    metrics = dict(loss=loss, accuracy=jnp.mean(jnp.argmax(logits, -1) == batch["label"]),
                   param_norm=optax.tree.norm(nnx.state(model, nnx.Param)),
                   lr=jnp.asarray(schedule(step), jnp.float32), ede_t=ede.t, ede_k=ede.k)
    if "bad_files" in batch:  # dataset.skip_bad_files: replaced files in this batch.
      metrics["bad_files"] = jnp.sum(batch["bad_files"])
    return nnx.state((model, optimizer)), metrics

  return train_step


def make_eval_step(graphdef: nnx.GraphDef, dataset: ml_collections.ConfigDict
                   ) -> Callable[[nnx.State, dict], dict]:
  """``step(model_state, batch) -> sums`` (loss, correct, correct5 = label in the top 5,
  count) over the unmasked examples of a padded batch. uint8 images are normalized
  with ``dataset.mean/std`` here; floats are used as they are."""

  def eval_step(model_state, batch):
    model = nnx.merge(graphdef, model_state)
    logits = model(data_device.model_input(batch["image"], dataset.mean, dataset.std))
    mask = batch["mask"].astype(jnp.float32)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    top5 = jax.lax.top_k(logits, min(5, logits.shape[-1]))[1]
    correct5 = jnp.any(top5 == batch["label"][:, None], axis=-1).astype(jnp.float32)
    return dict(loss=jnp.sum(cross_entropy(logits, batch["label"]) * mask),
                correct=jnp.sum(correct * mask), correct5=jnp.sum(correct5 * mask),
                count=jnp.sum(mask))

  return eval_step


def make_diagnose(graphdef: nnx.GraphDef, c: ml_collections.ConfigDict,
                  steps_per_epoch: int, total_steps: int) -> Callable:
  """``(model_state, step, prev_signs, x) -> (metrics, signs)`` for jit: the compact
  information-retention diagnostics of :mod:`irnet_jax.diagnostics` at the step's EDE,
  next to the train step (one fused computation, no host loop over layers)."""

  def diagnose(model_state, step, prev_signs, x):
    model = nnx.merge(graphdef, model_state)  # Eval mode: BN statistics untouched.
    ede = ede_at(c, step, steps_per_epoch, total_steps)
    x = data_device.model_input(x, c.dataset.mean, c.dataset.std)
    metrics = diagnostics.measure(model, ede, prev_signs, x)
    return metrics, diagnostics.weight_signs(model)

  return diagnose


# ------------------------------------------------------------------ host helpers


def params_fingerprint(model_state: Any) -> str:
  """sha256 over every parameter and BN statistic, in sorted path order."""
  h = hashlib.sha256()
  flat = sorted(((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(model_state)),
                key=lambda kv: kv[0])
  for name, var in flat:
    value = np.asarray(jax.device_get(var.get_value() if isinstance(var, nnx.Variable)
                                      else var))
    h.update(name.encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()


class MetricsWriter:
  """Appends one JSON object per line to ``metrics.jsonl`` (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled

  def truncate_after(self, step: int) -> None:
    """Drops records past ``step``: a resumed run re-logs what followed its checkpoint."""
    if not (self.enabled and os.path.exists(self.path)):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if json.loads(line).get("step", 0) <= step:
          kept.append(line)
      except json.JSONDecodeError:  # A line cut by a kill.
        continue
    with open(self.path, "w") as f:
      f.writelines(kept)

  def write(self, record: dict) -> None:
    if self.enabled:
      with open(self.path, "a") as f:
        f.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")


def _jsonable(v):
  return v.item() if hasattr(v, "item") else v


def _global_batch(local: dict, sharding: NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def evaluate(eval_step, model_state, c: ml_collections.ConfigDict,
             sharding: NamedSharding) -> dict:
  """Loss, top-1 and top-5 accuracy over every test image (padded last batch masked
  out): ``dict(loss, accuracy, top5_accuracy, count)``."""
  totals = dict(loss=0.0, correct=0.0, correct5=0.0, count=0.0)
  for local in data.eval_batches(c.dataset, c.eval_batch_size, jax.process_index(),
                                 jax.process_count()):
    out = jax.device_get(eval_step(model_state, _global_batch(local, sharding)))
    for k in totals:
      totals[k] += float(out[k])
  n = max(totals["count"], 1.0)
  return dict(loss=totals["loss"] / n, accuracy=totals["correct"] / n,
              top5_accuracy=totals["correct5"] / n, count=int(totals["count"]))


# ------------------------------------------------------------------ the loop


class Setup(NamedTuple):
  """Everything the loop (and experiments/throughput.py) needs, built once."""
  state: nnx.State                 # (model, optimizer) state, replicated on the mesh.
  train_step: Callable             # jitted (state, batch) -> (state, metrics), donates state.
  eval_step: Callable              # jitted (model_state, batch) -> sums.
  batch_sharding: NamedSharding    # Batch split over the mesh's "data" axis.
  mesh: Mesh
  diagnose: Callable               # jitted (model_state, step, prev_signs, x) -> (metrics, signs).
  conv_impl: str                   # The resolved convolution backend (irnet_jax.kernels).


def build(c: ml_collections.ConfigDict, devices: list, steps_per_epoch: int,
          total_steps: int) -> Setup:
  """Model, optimizer, mesh and the jitted steps of config ``c`` (num_classes resolved).

  ``c.model.conv_impl`` is resolved for ``devices`` (a multi-device CPU mesh gets an
  XLA backend: XLA partitions its convolutions over the batch, not the CPU kernels).
  """
  mesh = Mesh(np.array(devices), ("data",))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  model = config_lib.build_model(c, devices=devices)
  schedule = learning_rate_schedule(c, steps_per_epoch, total_steps)
  optimizer = nnx.Optimizer(model, make_optimizer(c, schedule), wrt=nnx.Param)
  model.eval()
  eval_graphdef, _ = nnx.split(model)
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  state = jax.device_put(state, replicated)
  step = make_train_step(graphdef, c, schedule, steps_per_epoch, total_steps)
  train_step = jax.jit(step, in_shardings=(replicated, batch_sharding),
                       out_shardings=(replicated, replicated), donate_argnums=0)
  eval_step = jax.jit(make_eval_step(eval_graphdef, c.dataset),
                      in_shardings=(replicated, batch_sharding), out_shardings=replicated)
  diagnose = jax.jit(make_diagnose(eval_graphdef, c, steps_per_epoch, total_steps))
  return Setup(state, train_step, eval_step, batch_sharding, mesh, diagnose,
               model.conv_impl)


class _Interval:
  """Host-side averages of the train metrics between two log events."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.sums, self.count, self.images, self.start = {}, 0, 0, time.perf_counter()
    self.bad_files = None

  def add(self, metrics: dict, images: int):
    for k in ("loss", "accuracy", "param_norm"):
      self.sums[k] = self.sums.get(k, 0.0) + float(metrics[k])
    self.count += 1
    self.images += images
    if "bad_files" in metrics:
      self.bad_files = (self.bad_files or 0) + int(metrics["bad_files"])
    self.last = metrics

  def summary(self) -> dict:
    seconds = max(time.perf_counter() - self.start, 1e-9)
    out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    out.update(lr=float(self.last["lr"]), ede_t=float(self.last["ede_t"]),
               ede_k=float(self.last["ede_k"]), images_per_sec=self.images / seconds)
    if self.bad_files is not None:
      out["bad_files"] = self.bad_files  # Replaced undecodable files since the last log.
    return out


def select_devices(num_devices: int) -> list:
  """All devices (-1), or the first ``num_devices`` of a single-process run."""
  if num_devices is None or num_devices <= 0:
    return jax.devices()
  if jax.process_count() > 1 or num_devices > jax.device_count():
    raise ValueError(f"config.num_devices={num_devices} but this run has "
                     f"{jax.device_count()} devices in {jax.process_count()} process(es); "
                     "use -1 (all devices) or a smaller number on a single host.")
  return jax.devices()[:num_devices]


def _check_finite(step: int, metrics: dict, last_good: int, ckpt_dir: str) -> None:
  loss, norm = float(metrics["loss"]), float(metrics["param_norm"])
  if not (math.isfinite(loss) and math.isfinite(norm)):
    raise FloatingPointError(
        f"the training loss became {loss} (parameter norm {norm}) at step {step}: the run "
        "diverged and was stopped. "
        f"The last good checkpoint (step {last_good}) is kept in {ckpt_dir}. Lower "
        "--config.optimizer.learning_rate (or check the input data), then rerun the same "
        "command to resume from that checkpoint.")


class Plan(NamedTuple):
  """A run checked against its devices, data and workdir, before anything is built."""
  config: ml_collections.ConfigDict  # A copy, model.num_classes resolved.
  devices: list
  steps_per_epoch: int
  total_steps: int
  eval_every: int                    # Steps between evaluations.
  derived: dict                      # Recorded in run.json next to the config's fields.


def prepare(config: ml_collections.ConfigDict, workdir: str) -> Plan:
  """Validates ``config``, resolves it against the data and checks that ``workdir``
  holds no other run (:func:`checkpointing.check_run`). Cheap, and writes nothing."""
  c = ml_collections.ConfigDict(config.to_dict())
  devices = select_devices(c.get("num_devices", -1))
  config_lib.validate(c, len(devices))
  # The convolution backend, resolved once for these devices; config.json, the log
  # and final_metrics.json record it.
  c.model.conv_impl = kernels.resolve(c.model.get("conv_impl", "auto"), devices)
  log.info("convolutions: conv_impl=%s on %d %s device(s)", c.model.conv_impl,
           len(devices), devices[0].platform)
  info = data.dataset_info(c.dataset)
  if c.model.num_classes <= 0:
    c.model.num_classes = info.num_classes
  elif c.model.num_classes < info.num_classes:
    raise ValueError(f"The data has labels up to {info.num_classes - 1} but "
                     f"config.model.num_classes={c.model.num_classes}; set "
                     f"--config.model.num_classes={info.num_classes} (or -1: from the data).")
  total_steps, steps_per_epoch = config_lib.num_train_steps(c, info.num_train)
  eval_every = c.eval_every_steps if c.eval_every_steps > 0 else steps_per_epoch
  derived = dict(num_train_examples=info.num_train, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps)
  checkpointing.check_run(workdir, c, derived)
  return Plan(c, devices, steps_per_epoch, total_steps, eval_every, derived)


def restore(c: ml_collections.ConfigDict, state: nnx.State, ckpt: checkpointing.Checkpointer,
            fingerprint: str) -> tuple[nnx.State, int, float]:
  """``(state, start_step, train_seconds)`` to start from: the newest checkpoint of this
  run, else the model of ``c.init_from``'s newest checkpoint with a fresh optimizer,
  else ``state`` (the fresh build). Raises ``IncompatibleCheckpointError`` for
  checkpoints of another run or model; damaged ones fall back with a warning."""
  restored = ckpt.restore_latest(state[0], state[1], fingerprint)
  if restored is not None:
    model_state, opt_state, meta = restored
    log.info("resumed from step %d of %s", meta["step"], ckpt.directory)
    return (nnx.State({0: model_state, 1: opt_state}), int(meta["step"]),
            float(meta.get("train_seconds", 0.0)))
  if c.get("init_from"):
    source = checkpointing.Checkpointer(os.path.join(c.init_from, "checkpoints"))
    try:
      restored = source.restore_latest(state[0])
    finally:
      source.close()
    if restored is None:
      raise ValueError(f"config.init_from={c.init_from!r} has no checkpoint; give the "
                       "--workdir of a training run or of `python -m irnet_jax.convert`.")
    log.info("initialized the model from step %d of %s", restored[2]["step"], c.init_from)
    return nnx.State({0: restored[0], 1: state[1]}), 0, 0.0
  return state, 0, 0.0


class _Loop:
  """The host side of the training loop: dispatch steps, log the previous step's
  metrics (never block on the step just dispatched), checkpoint, evaluate."""

  def __init__(self, plan: Plan, setup: Setup, ckpt: checkpointing.Checkpointer,
               writer: MetricsWriter, fingerprint: str, start_step: int,
               train_seconds: float):
    self.plan, self.c, self.setup, self.ckpt, self.writer = (plan, plan.config, setup, ckpt,
                                                             writer)
    self.fingerprint, self.start_step = fingerprint, start_step
    self.train_seconds, self.last_good = train_seconds, start_step
    self.interval, self.pending, self.prev_signs = _Interval(), None, None
    self.loop_start = time.perf_counter()

  def seconds(self) -> float:
    """Training seconds of the run so far, over every restart."""
    return self.train_seconds + time.perf_counter() - self.loop_start

  def meta(self, step: int) -> dict:
    c = self.c
    return dict(step=step, seed=c.seed, model=c.model.name, data_position=step,
                steps_per_epoch=self.plan.steps_per_epoch, num_classes=c.model.num_classes,
                train_seconds=self.seconds(), run_fingerprint=self.fingerprint)

  def drain(self) -> None:
    """Fetch the previous step's metrics (already computed or nearly), check them."""
    if self.pending is not None:
      done, metrics = self.pending
      metrics = jax.device_get(metrics)
      _check_finite(done, metrics, self.last_good, self.ckpt.directory)
      self.interval.add(metrics, self.c.batch_size)
      self.pending = None

  def run(self, state: nnx.State, step_hook: Callable[[int], None] | None) -> nnx.State:
    """Steps ``start_step .. total_steps`` from ``state``; returns the final state."""
    c, setup, plan = self.c, self.setup, self.plan
    train_ds = data.train_dataset(c.dataset, c.batch_size, c.seed, plan.total_steps,
                                  jax.process_index(), jax.process_count())
    # The data is a pure function of (seed, step), so resuming is slicing.
    batches = data.train_iterator(train_ds, self.start_step, **data.loader_options(
        c.dataset, c.batch_size // jax.process_count()))
    bar = tqdm(total=plan.total_steps, initial=self.start_step, unit="step",
               dynamic_ncols=True, disable=not (self.writer.enabled and c.progress_bar),
               desc=c.model.name)
    try:
      for step in range(self.start_step, plan.total_steps):
        batch = _global_batch(next(batches), setup.batch_sharding)
        state, metrics = setup.train_step(state, batch)
        self.drain()  # Step `step - 1`.
        self.pending = (step + 1, metrics)
        bar.update(1)
        self.after_step(step + 1, state, batch, bar)
        if step_hook is not None:
          step_hook(step + 1)
      self.drain()
    finally:
      bar.close()
    return state

  def after_step(self, done: int, state: nnx.State, batch: dict, bar: tqdm) -> None:
    """Logging, checkpoint, evaluation and diagnostics due after step ``done``."""
    c, plan, last = self.c, self.plan, done == self.plan.total_steps
    if done % c.log_every_steps == 0 or last:
      self.drain()
      record = self.interval.summary()
      self.writer.write(dict(step=done, split="train", **record))
      bar.set_postfix(loss=f"{record['loss']:.3f}", img_s=f"{record['images_per_sec']:.0f}")
      self.interval.reset()
    if done % c.checkpoint_every_steps == 0 or last:
      self.drain()  # Never checkpoint a diverged state.
      self.ckpt.save(done, state[0], state[1], self.meta(done))
      self.last_good = done
    if done % plan.eval_every == 0 or last:
      self.drain()
      result = evaluate(self.setup.eval_step, state[0], c, self.setup.batch_sharding)
      self.writer.write(dict(step=done, split="test", loss=result["loss"],
                             accuracy=result["accuracy"]))
      self.interval.reset()  # Keep eval time out of the training throughput.
    if c.analysis_every_steps > 0 and done % c.analysis_every_steps == 0:
      diag, self.prev_signs = self.setup.diagnose(state[0], jnp.asarray(done),
                                                  self.prev_signs, batch["image"])
      self.writer.write(dict(step=done, split="analysis", **diagnostics.to_floats(diag)))


def final_report(plan: Plan, setup: Setup, state: nnx.State, train_seconds: float,
                 workdir: str) -> dict:
  """Evaluates the final state; writes and returns ``final_metrics.json``."""
  c = plan.config
  final_eval = evaluate(setup.eval_step, state[0], c, setup.batch_sharding)
  final = dict(test_accuracy=final_eval["accuracy"], test_loss=final_eval["loss"],
               test_examples=final_eval["count"], train_steps=plan.total_steps,
               train_seconds=train_seconds, params_fingerprint=params_fingerprint(state[0]),
               model=c.model.name, seed=c.seed, conv_impl=setup.conv_impl)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
      json.dump(final, f, indent=2)
  return final


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_hook: Callable[[int], None] | None = None) -> dict:
  """Trains and evaluates ``config`` in ``workdir``, resuming from its latest checkpoint.

  Phases: :func:`prepare` (validate, resolve, check the workdir's run: a restart
  with another config stops here, the workdir untouched), :func:`build`,
  :func:`restore`, then ``config.json``/``run.json`` are written, the loop
  (:class:`_Loop`), and :func:`final_report`.

  Args:
    config: an experiment config (``configs/*.py``).
    workdir: output directory: ``checkpoints/``, ``metrics.jsonl``,
      ``final_metrics.json``, ``config.json``, ``run.json``.
    step_hook: called on the host with the number of completed steps after each step
      (after any checkpoint of that step was started). An exception raised in it
      aborts the run like a crash; tests use it to simulate a kill.

  Returns:
    The final metrics (also written to ``final_metrics.json``).
  """
  plan = prepare(config, workdir)
  c, is_main = plan.config, jax.process_index() == 0
  setup = build(c, plan.devices, plan.steps_per_epoch, plan.total_steps)
  fingerprint = checkpointing.run_fingerprint(checkpointing.run_spec(c))
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), c.keep_checkpoints)
  try:
    state, start_step, train_seconds = restore(c, setup.state, ckpt, fingerprint)
    writer = MetricsWriter(workdir, is_main)
    if is_main:  # Only now that the workdir is known to hold this run (or none).
      checkpointing.record_run(workdir, c, plan.derived)
      writer.truncate_after(start_step)
    loop = _Loop(plan, setup, ckpt, writer, fingerprint, start_step, train_seconds)
    state = loop.run(state, step_hook)
    train_seconds = loop.seconds()
  finally:
    ckpt.wait()
    ckpt.close()
  return final_report(plan, setup, state, train_seconds, workdir)
