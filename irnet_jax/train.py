"""The training loop: jitted steps over a device mesh, eval, metrics, checkpoints.

``train_and_evaluate(config, workdir)`` is what ``python -m irnet_jax.main`` runs.
Sections, top to bottom: host helpers (fingerprint, evaluation), :func:`build` (model,
optimizer, mesh, the jitted functions of :mod:`irnet_jax.steps`, resident data), the
input feeds (host pipeline or data held on the device), and the loop in named phases:
:func:`prepare` (validate, resolve, check the workdir's run), :func:`build`,
:func:`restore`, :class:`_Loop` and :func:`final_report`.

Design: ``graphdef, state = nnx.split((model, optimizer))`` once; the step is pure,
jitted with the batch sharded over the mesh's ``data`` axis and the state replicated
(BN statistics are therefore over the global batch) and donated. One device call runs
``config.steps_per_call`` = K steps (a ``lax.scan`` of the same step); logging,
evaluation, checkpoints, preemption checks and the profiler act between calls, and the
host reads a call's metrics while the next call runs. EDE's (t, k) and the learning rate
come from the optimizer's step counter inside the step: one compilation for the whole
run. Every random draw is a function of (seed, step), so a resumed run is the same run.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from typing import Any, Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from irnet_jax import (
  checkpointing,
  data,
  diagnostics,
  kernels,
  optim,
  preemption,
  run_record,
  steps,
)
from irnet_jax import config as config_lib
from irnet_jax import workdir as workdir_lib

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ host helpers


def params_fingerprint(model_state: Any) -> str:
  """sha256 over every array of a model state (parameters, BN statistics, RNG streams'
  keys and counts), in sorted path order."""
  h = hashlib.sha256()
  flat = sorted(((".".join(map(str, p)), v) for p, v in nnx.to_flat_state(model_state)),
                key=lambda kv: kv[0])
  for name, var in flat:
    value = checkpointing.host_array(var.get_value() if isinstance(var, nnx.Variable)
                                     else var)
    h.update(name.encode())
    h.update(value.tobytes())
  return h.hexdigest()


def _global_batch(local: dict, sharding: NamedSharding) -> dict:
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def _totals_to_result(totals: dict) -> dict:
  n = max(float(totals["count"]), 1.0)
  return dict(loss=float(totals["loss"]) / n, accuracy=float(totals["correct"]) / n,
              top5_accuracy=float(totals["correct5"]) / n, count=int(totals["count"]))


def evaluate(eval_step, model_state, c: ml_collections.ConfigDict,
             sharding: NamedSharding) -> dict:
  """Loss, top-1 and top-5 accuracy over every test image (padded last batch masked
  out) through the host pipeline: ``dict(loss, accuracy, top5_accuracy, count)``."""
  totals = dict(loss=0.0, correct=0.0, correct5=0.0, count=0.0)
  for local in data.eval_batches(c.dataset, c.eval_batch_size, jax.process_index(),
                                 jax.process_count()):
    out = jax.device_get(eval_step(model_state, _global_batch(local, sharding)))
    for k in totals:
      totals[k] += float(out[k])
  return _totals_to_result(totals)


# ------------------------------------------------------------------ build


class Resident(NamedTuple):
  """The data set held on the device(s) (``dataset.cache_on_device``)."""
  train: dict          # train_image uint8 (N, H, W, 3), train_label int32 (N,): replicated.
  test: dict           # image (M, E, H, W, 3), label, mask (M, E): batches split on "data".
  num_train: int


class Setup(NamedTuple):
  """Everything the loop (and experiments/throughput.py) needs, built once."""
  state: nnx.State                 # (model, optimizer) state, replicated on the mesh.
  train_step: Callable             # jitted (state, batch) -> (state, metrics), donates state.
  train_call: Callable             # K steps: (state, batches (K, B, ...)) or, with resident
                                   # data, (state, resident.train, indices (K, B)); jitted
                                   # lax.scan or K dispatches (resolve_call_mode).
  eval_step: Callable              # jitted (model_state, batch) -> sums.
  eval_all: Callable               # jitted (model_state, resident.test) -> sums.
  batch_sharding: NamedSharding    # Batch split over the mesh's "data" axis.
  stacked_sharding: NamedSharding  # (K, B, ...): the batch axis split over "data".
  mesh: Mesh
  diagnose: Callable               # jitted (model_state, step, prev_signs, x) -> (metrics, signs).
  conv_impl: str                   # The resolved convolution backend (irnet_jax.kernels).
  resident: Resident | None        # The data on the device, or None (host pipeline).
  signs: Any                       # Shapes/shardings of diagnose's weight signs (restore).


def _put(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array every process holds whole (multi-host safe)."""
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def place_resident(c: ml_collections.ConfigDict, mesh: Mesh) -> Resident:
  """Puts the uint8 data set on the mesh once: the training set replicated (each device
  gathers its share of a batch without communication; CIFAR-10 is 150 MB), the test set
  as padded batches of ``eval_batch_size`` split over the data axis."""
  arrays = data.resident_arrays(c.dataset)
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(None, "data"))
  images, labels = arrays["test_image"], arrays["test_label"]
  e = c.eval_batch_size
  m = math.ceil(len(images) / e)
  pad = m * e - len(images)
  mask = np.concatenate([np.ones(len(images), bool), np.zeros(pad, bool)])
  images = np.concatenate([images, np.zeros((pad,) + images.shape[1:], np.uint8)])
  labels = np.concatenate([labels, np.zeros(pad, np.int32)])
  test = dict(image=images.reshape((m, e) + images.shape[1:]), label=labels.reshape(m, e),
              mask=mask.reshape(m, e))
  return Resident(
      train=dict(train_image=_put(arrays["train_image"], replicated),
                 train_label=_put(arrays["train_label"], replicated)),
      test={k: _put(v, split) for k, v in test.items()}, num_train=len(arrays["train_label"]))


CALL_MODES = ("auto", "scan", "dispatch")


def resolve_call_mode(mode: str, devices: list) -> str:
  """How a call runs its K steps: ``"scan"`` (one ``lax.scan``, one dispatch: GPU, TPU)
  or ``"dispatch"`` (the jitted step K times from the host: CPU). ``"auto"`` picks by the
  devices' platform, once, when the run is planned (config.json records the result).

  Why not scan on CPU: XLA:CPU compiles a step inside a while loop differently (its
  convolutions ran ~30% slower, 229 vs 323 img/s for ResNet-20 at batch 128 on the
  2-core development machine, 2026-12-04), while a dispatch costs microseconds next to a
  300 ms step. Within a mode any K gives the parameters of K = 1 bit for bit; the two
  modes round differently (a step in a loop body is compiled differently), so
  :func:`prepare` records the mode with the run and a resume keeps it.
  """
  if mode not in CALL_MODES:
    raise ValueError(f"config.steps_per_call_mode={mode!r}; choose one of {list(CALL_MODES)}.")
  if mode != "auto":
    return mode
  return "dispatch" if devices[0].platform == "cpu" else "scan"


def build(c: ml_collections.ConfigDict, devices: list, steps_per_epoch: int,
          total_steps: int) -> Setup:
  """Model, optimizer, mesh and the jitted functions of config ``c`` (num_classes
  resolved); with ``c.dataset.cache_on_device``, the data placed on the devices.

  ``c.model.conv_impl`` is resolved for ``devices`` (a multi-device CPU mesh gets an
  XLA backend: XLA partitions its convolutions over the batch, not the CPU kernels).
  """
  mesh = Mesh(np.array(devices), ("data",))
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data"))
  stacked_sharding = NamedSharding(mesh, P(None, "data"))
  conv_impl = kernels.resolve(c.model.get("conv_impl", "auto"), devices)
  model = config_lib.build_model(c, devices=devices, conv_impl=conv_impl)
  schedule = optim.learning_rate_schedule(c, steps_per_epoch, total_steps)
  if c.optimizer.get("binary") == "bop":
    optim.sign_binary_kernels(model)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(c, schedule, model), wrt=nnx.Param)
  model.eval()
  eval_graphdef, _ = nnx.split(model)
  model.train()
  graphdef, state = nnx.split((model, optimizer))
  state = jax.device_put(state, replicated)
  step = steps.make_train_step(graphdef, c, schedule, steps_per_epoch, total_steps)
  train_step = jax.jit(step, in_shardings=(replicated, batch_sharding),
                       out_shardings=(replicated, replicated), donate_argnums=0)
  resident = place_resident(c, mesh) if c.dataset.get("cache_on_device") else None
  mode = resolve_call_mode(c.get("steps_per_call_mode", "auto"), devices)
  shardings = dict(out_shardings=(replicated, replicated), donate_argnums=0)
  if resident is None and mode == "scan":
    train_call = jax.jit(steps.scan_steps(step), in_shardings=(replicated, stacked_sharding),
                         **shardings)
  elif resident is None:
    train_call = steps.dispatch_steps(train_step)
  elif mode == "scan":
    train_call = jax.jit(steps.scan_resident_steps(step),
                         in_shardings=(replicated, replicated, stacked_sharding), **shardings)
  else:
    train_call = steps.dispatch_steps(jax.jit(
        steps.resident_step(step), in_shardings=(replicated, replicated, batch_sharding),
        **shardings))
  eval_fn = steps.make_eval_step(eval_graphdef, c.dataset)
  eval_step = jax.jit(eval_fn, in_shardings=(replicated, batch_sharding),
                      out_shardings=replicated)
  eval_all = jax.jit(steps.scan_eval(eval_fn), in_shardings=(replicated, stacked_sharding),
                     out_shardings=replicated)
  diagnose = jax.jit(steps.make_diagnose(eval_graphdef, c, steps_per_epoch, total_steps))
  signs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
                       jax.eval_shape(steps.make_weight_signs(eval_graphdef), state[0]))
  return Setup(state, train_step, train_call, eval_step, eval_all, batch_sharding,
               stacked_sharding, mesh, diagnose, conv_impl, resident, signs)


def evaluate_setup(setup: Setup, model_state: nnx.State, c: ml_collections.ConfigDict
                   ) -> dict:
  """:func:`evaluate` through the resident test set when there is one (one call)."""
  if setup.resident is None:
    return evaluate(setup.eval_step, model_state, c, setup.batch_sharding)
  return _totals_to_result(jax.device_get(setup.eval_all(model_state, setup.resident.test)))


# ------------------------------------------------------------------ input feeds


class Call(NamedTuple):
  """One device call's input, as the loop dispatches it."""
  steps: int               # Optimizer steps in the call (K, or fewer for the last).
  args: tuple              # Arguments of ``Setup.train_call`` after ``state``.
  probe: Callable[[], jax.Array]  # The call's last training images (for diagnostics).


def _call_spans(start: int, total: int, k: int) -> Iterator[tuple[int, int]]:
  """``(first step, steps)`` of each call: K steps, ending on multiples of K (where the
  log/eval/checkpoint cadences fall). A run resumed off that grid, e.g. from a
  checkpoint of a run with another K, first makes a shorter call back onto it."""
  first = start
  while first < total:
    n = min(k - first % k, total - first)
    yield first, n
    first += n


def _host_calls(c: ml_collections.ConfigDict, setup: Setup, start: int, total: int
                ) -> Iterator[Call]:
  """Calls over the host pipeline: K batches stacked on a leading axis.

  K = 1 goes through the same scan (of length 1): XLA compiles a loop body differently
  from a bare step, and K steps per call must give the parameters of K = 1 bit for bit.
  """
  train_ds = data.train_dataset(c.dataset, c.batch_size, c.seed, total,
                                jax.process_index(), jax.process_count())
  # The data is a pure function of (seed, step), so resuming is slicing.
  batches = data.train_iterator(train_ds, start, **data.loader_options(
      c.dataset, c.batch_size // jax.process_count()))
  for first, n in _call_spans(start, total, c.steps_per_call):
    local = [next(batches) for _ in range(n)]
    stacked = {key: np.stack([b[key] for b in local]) for key in local[0]}
    batch = _global_batch(stacked, setup.stacked_sharding)
    yield Call(n, (batch,), lambda b=batch: b["image"][-1])


def _resident_calls(c: ml_collections.ConfigDict, setup: Setup, start: int, total: int
                    ) -> Iterator[Call]:
  """Calls over the data on the device: the host sends K rows of indices per call."""
  resident = setup.resident
  for first, n in _call_spans(start, total, c.steps_per_call):
    local = data.train_indices(resident.num_train, c.batch_size, c.seed, first, n,
                               jax.process_index(), jax.process_count())
    indices = jax.make_array_from_process_local_data(setup.stacked_sharding, local)
    yield Call(n, (resident.train, indices),
               lambda i=indices: jnp.take(resident.train["train_image"], i[-1], axis=0))


# ------------------------------------------------------------------ the loop


class _Interval:
  """Host-side averages of the train metrics between two log events."""

  def __init__(self):
    self.reset()

  def reset(self):
    self.sums, self.count, self.bad_files = {}, 0, None
    self.restart_clock()

  def restart_clock(self):
    """Throughput counts from now (after compilation, or after an evaluation)."""
    self.images, self.start = 0, time.perf_counter()

  def add(self, metrics: dict, images: int):
    """Adds one call's metrics: arrays of shape (steps,)."""
    for k in ("loss", "accuracy", "param_norm"):
      self.sums[k] = self.sums.get(k, 0.0) + float(np.sum(metrics[k]))
    self.count += len(metrics["loss"])
    self.images += images
    if "bad_files" in metrics:
      self.bad_files = (self.bad_files or 0) + int(np.sum(metrics["bad_files"]))
    self.last = {k: v[-1] for k, v in metrics.items()}

  def summary(self) -> dict:
    seconds = max(time.perf_counter() - self.start, 1e-9)
    out = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    out.update(lr=float(self.last["lr"]), ede_t=float(self.last["ede_t"]),
               ede_k=float(self.last["ede_k"]))
    if self.images:  # None when the interval held only the compiling first call.
      out["images_per_sec"] = self.images / seconds
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


def _first_non_finite(metrics: dict) -> int | None:
  """Index of the first step of a call whose loss or parameter norm is not finite."""
  bad = [i for i, (loss, norm) in enumerate(zip(metrics["loss"], metrics["param_norm"]))
         if not (math.isfinite(float(loss)) and math.isfinite(float(norm)))]
  return bad[0] if bad else None


def _diverged(step: int, metrics: dict, i: int, last_good: int | None, ckpt_dir: str,
              c: ml_collections.ConfigDict) -> FloatingPointError:
  """The error of a diverged run: the step, the newest verified checkpoint, the levers."""
  at = step - len(metrics["loss"]) + i + 1
  levers = [f"--config.optimizer.learning_rate (now {c.optimizer.learning_rate}; try half)",
            f"--config.optimizer.warmup_steps (now {c.optimizer.warmup_steps})",
            f"--config.ede.t_max (now {c.ede.t_max}; a smaller t keeps EDE's gradient "
            "bounded)"]
  if c.compute_dtype != "float32":
    levers.append("--config.compute_dtype=float32")
  kept = (f"The last good checkpoint, step {last_good}, read back and verified, is kept in "
          f"{ckpt_dir}; the same command resumes from it." if last_good is not None else
          f"No checkpoint in {ckpt_dir} reads back verified; the same command starts over.")
  return FloatingPointError(
      f"the training loss became {float(metrics['loss'][i])} (parameter norm "
      f"{float(metrics['param_norm'][i])}) at step {at}: the run diverged and was stopped. "
      f"{kept} Levers that help: {'; '.join(levers)} (a changed config needs a "
      "new --workdir, or --config.init_from=<this workdir> to start from its model).")


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
  holds no other run (:func:`run_record.check_run`). Cheap, and writes nothing."""
  c = ml_collections.ConfigDict(config.to_dict())
  devices = select_devices(c.get("num_devices", -1))
  config_lib.validate(c, len(devices))
  # The convolution backend, resolved once for these devices; config.json, the log
  # and final_metrics.json record it.
  c.model.conv_impl = kernels.resolve(c.model.get("conv_impl", "auto"), devices)
  c.steps_per_call_mode = resolve_call_mode(c.get("steps_per_call_mode", "auto"), devices)
  log.info("convolutions: conv_impl=%s on %d %s device(s); %d step(s) per call (%s)",
           c.model.conv_impl, len(devices), devices[0].platform, c.steps_per_call,
           c.steps_per_call_mode)
  info = data.dataset_info(c.dataset)
  if c.model.num_classes <= 0:  # From the data; labels that are not class ids refused.
    c.model.num_classes = data.derived_num_classes(c.dataset) or info.num_classes
  elif c.model.num_classes < info.num_classes:
    raise ValueError(f"The data has labels up to {info.num_classes - 1} but "
                     f"config.model.num_classes={c.model.num_classes}; set "
                     f"--config.model.num_classes={info.num_classes} (or -1: from the data).")
  total_steps, steps_per_epoch = config_lib.num_train_steps(c, info.num_train)
  eval_every = c.eval_every_steps if c.eval_every_steps > 0 else steps_per_epoch
  if c.eval_every_steps <= 0 and steps_per_epoch % c.steps_per_call:
    divisors = [d for d in range(2, min(steps_per_epoch, 512) + 1) if steps_per_epoch % d == 0]
    raise config_lib.ConfigError(
        f"evaluation is at the end of every epoch ({steps_per_epoch} steps) but "
        f"config.steps_per_call={c.steps_per_call} does not divide it; set "
        f"--config.steps_per_call to one of {divisors[:12]}, or "
        f"--config.eval_every_steps to a multiple of {c.steps_per_call}.")
  # The call mode is recorded with the run: XLA compiles a step inside lax.scan
  # differently from the step alone, so "scan" and "dispatch" round differently and a
  # run finishes in the mode it started in (run_record.check_run).
  derived = dict(num_train_examples=info.num_train, steps_per_epoch=steps_per_epoch,
                 total_steps=total_steps, steps_per_call_mode=c.steps_per_call_mode)
  run_record.check_run(workdir, c, derived)
  return Plan(c, devices, steps_per_epoch, total_steps, eval_every, derived)


class Start(NamedTuple):
  """Where the loop starts: the state, its step, and what the run had before."""
  state: nnx.State
  step: int
  train_seconds: float
  signs: Any | None  # The weight signs of the last analysis before ``step``.


def _joined(model_state: nnx.State, opt_state: nnx.State) -> nnx.State:
  """``(model, optimizer)`` state with the pytree structure of ``nnx.split((model,
  optimizer))`` (nested plain dicts under one State), which a ``lax.scan`` carry must
  keep: States nested in a State flatten to another structure."""
  return nnx.State({0: model_state.raw_mapping, 1: opt_state.raw_mapping})


def restore(c: ml_collections.ConfigDict, setup: Setup, ckpt: checkpointing.Checkpointer,
            fingerprint: str) -> Start:
  """Where to start: the newest verified checkpoint of this run, else the model of
  ``c.init_from``'s newest checkpoint with a fresh optimizer, else the fresh build.
  Raises ``IncompatibleCheckpointError`` for checkpoints of another run or model;
  damaged or corrupt ones fall back with a warning."""
  state = setup.state
  # This run's own checkpoints: damaged ones are moved aside, so their steps are saved
  # again; another workdir's (init_from) are only read.
  restored = ckpt.restore_latest(state[0], state[1], fingerprint, repair=True,
                                 signs=setup.signs)
  if restored is not None:
    log.info("resumed from step %d of %s", restored.meta["step"], ckpt.directory)
    return Start(_joined(restored.model, restored.opt), int(restored.meta["step"]),
                 float(restored.meta.get("train_seconds", 0.0)), restored.signs)
  if c.get("init_from"):  # Another workdir's model, only read; a fresh optimizer.
    model_state, meta = checkpointing.restore_model(c.init_from, state[0])
    log.info("initialized the model from step %d of %s", meta["step"], c.init_from)
    return Start(_joined(model_state, state[1]), 0, 0.0, None)
  return Start(state, 0, 0.0, None)


class _Profiler:
  """``jax.profiler`` trace of ``config.profile_steps`` (START, STOP) into
  ``WORKDIR/tensorboard`` (``plugins/profile/<run>/``, TensorBoard's profile plugin and
  xprof read it), started and stopped between calls."""

  def __init__(self, span: tuple[int, int] | None, workdir: str):
    self.span, self.logdir, self.active = span, os.path.join(workdir, "tensorboard"), False

  def before(self, step: int, steps: int) -> None:
    """Starts the trace before a call of ``steps`` steps from ``step`` that reaches into
    the span (a span inside one call traces that whole call)."""
    if self.span and not self.active and step < self.span[1] and step + steps > self.span[0]:
      jax.profiler.start_trace(self.logdir)
      self.active = True

  def after(self, step: int, state: Any) -> None:
    if self.active and step >= self.span[1]:
      self.stop(state)

  def stop(self, state: Any) -> None:
    if self.active:
      jax.block_until_ready(state)
      jax.profiler.stop_trace()
      self.active = False
      log.info("profile of steps %d-%d written to %s", *self.span, self.logdir)


class _Progress:
  """The progress bar (tqdm): it starts once the first call, which compiles, is done
  (compilation time shown apart, never as step 1's), and its rate and ETA are those of
  training: time spent evaluating, analysing and checkpointing is taken out."""

  def __init__(self, total: int, enabled: bool, desc: str):
    self.total, self.enabled, self.desc = total, enabled, desc
    self.bar: tqdm | None = None

  def start(self, done: int, compile_seconds: float) -> None:
    if not self.enabled:  # (A disabled tqdm has no clock to correct.)
      return
    # smoothing=0: the rate is (steps since start) / (time since start), which
    # exclude() corrects; an exponential average would jump after each evaluation.
    self.bar = tqdm(total=self.total, initial=done, unit="step", dynamic_ncols=True,
                    desc=self.desc, smoothing=0)
    self.bar.set_postfix(compile=f"{compile_seconds:.1f}s")

  def update(self, steps: int) -> None:
    if self.bar is not None:
      self.bar.update(steps)

  def exclude(self, seconds: float) -> None:
    """Takes ``seconds`` of work other than training out of the rate."""
    if self.bar is not None:
      self.bar.start_t += seconds

  def postfix(self, **values: str) -> None:
    if self.bar is not None:
      self.bar.set_postfix(**values)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


class _Loop:
  """The host side of the training loop: dispatch calls of K steps, log the previous
  call's metrics (never block on the call just dispatched), checkpoint, evaluate,
  stop on preemption."""

  def __init__(self, plan: Plan, setup: Setup, ckpt: checkpointing.Checkpointer,
               writer: workdir_lib.MetricsWriter, fingerprint: str, start: Start,
               workdir: str):
    self.plan, self.c, self.setup, self.ckpt, self.writer = (plan, plan.config, setup, ckpt,
                                                             writer)
    self.fingerprint, self.start_step = fingerprint, start.step
    self.train_seconds = start.train_seconds
    self.interval, self.pending, self.prev_signs = _Interval(), None, start.signs
    self.profiler = _Profiler(config_lib.profile_range(plan.config), workdir)
    self.compile_seconds: float | None = None  # The first call's, until it is logged.
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
    """Fetch the previous call's metrics (already computed or nearly), check them."""
    if self.pending is not None:
      done, call, metrics = self.pending
      metrics = jax.device_get(metrics)  # Arrays of shape (call.steps,).
      bad = _first_non_finite(metrics)
      if bad is not None:  # The step named is one read back now and verified.
        good = self.ckpt.newest_verified(self.setup.state[0], self.setup.state[1], done)
        raise _diverged(done, metrics, bad, good, self.ckpt.directory, self.c)
      self.interval.add(metrics, call.steps * self.c.batch_size)
      self.pending = None

  def run(self, state: nnx.State, step_hook: Callable[[int], None] | None,
          stop: preemption.Preemption) -> nnx.State:
    """Steps ``start_step .. total_steps`` from ``state``; returns the final state.
    Raises :class:`preemption.Preempted` after checkpointing when ``stop`` says so."""
    c, plan = self.c, self.plan
    feed = _resident_calls if self.setup.resident is not None else _host_calls
    bar = _Progress(plan.total_steps, self.writer.enabled and c.progress_bar, c.model.name)
    done, first = self.start_step, True
    try:
      for index, call in enumerate(feed(c, self.setup, self.start_step, plan.total_steps)):
        self.profiler.before(done, call.steps)
        started = time.perf_counter()
        state, metrics = self.setup.train_call(state, *call.args)
        self.drain()  # The previous call, computed while this one was being dispatched.
        done += call.steps
        self.pending = (done, call, metrics)
        if first:  # Compilation (and the first call): its own figure, not in img/s.
          self.drain()
          self.compile_seconds, first = time.perf_counter() - started, False
          self.interval.restart_clock()
          bar.start(done, self.compile_seconds)
        else:
          bar.update(call.steps)
        self.profiler.after(done, state)
        self.after_call(done, state, call, bar)
        if step_hook is not None:
          step_hook(done)
        if stop.requested(index) and done < plan.total_steps:
          self.preempted(done, state)
      self.drain()
    finally:
      self.profiler.stop(state)
      bar.close()
    return state

  def preempted(self, done: int, state: nnx.State) -> None:
    """Checkpoint at the reached step (unless just saved), say so, stop the run."""
    self.drain()
    # The record first, then the checkpoint (see after_call).
    self.writer.write(dict(step=done, split="event", preempted=1.0,
                           train_seconds=self.seconds()))
    if done not in self.ckpt.all_steps():  # A periodic checkpoint may have just saved it.
      self.save(done, state)
    self.ckpt.wait()
    log.warning("preemption signal: checkpoint saved at step %d of %d; rerun the same "
                "command to resume", done, self.plan.total_steps)
    raise preemption.Preempted(done, self.ckpt.directory)

  def save(self, done: int, state: nnx.State) -> None:
    """Checkpoints step ``done``, after every record up to it was written (a
    :meth:`MetricsWriter.write` returns with its line fsynced and its events in the
    file): a committed checkpoint then implies its step's records, and a resume (which
    drops the records past its step) leaves each logged step exactly once, whenever a
    kill came."""
    self.drain()  # Never checkpoint a diverged state.
    self.ckpt.save(done, state[0], state[1], self.meta(done), signs=self.prev_signs)

  def after_call(self, done: int, state: nnx.State, call: Call, bar: _Progress) -> None:
    """Logging, evaluation, diagnostics, then the checkpoint due after step ``done``
    (every cadence is a multiple of the steps per call, see config.validate)."""
    c, plan, last = self.c, self.plan, done == self.plan.total_steps
    if done % c.log_every_steps == 0 or last:
      self.drain()
      record = self.interval.summary()
      if self.compile_seconds is not None:
        record["compile_seconds"] = self.compile_seconds
        self.compile_seconds = None
      self.writer.write(dict(step=done, split="train", **record))
      bar.postfix(loss=f"{record['loss']:.3f}", img_s=f"{record.get('images_per_sec', 0):.0f}")
      self.interval.reset()
    evaluate = done % plan.eval_every == 0 or last
    analyse = c.analysis_every_steps > 0 and done % c.analysis_every_steps == 0
    checkpoint = done % c.checkpoint_every_steps == 0 or last
    if not (evaluate or analyse or checkpoint):
      return  # Nothing to wait for: the next call is dispatched at once.
    self.drain()  # The step's own compute: before the clock of the work below starts.
    started = time.perf_counter()
    if evaluate:
      result = evaluate_setup(self.setup, state[0], c)
      self.writer.write(dict(step=done, split="test", loss=result["loss"],
                             accuracy=result["accuracy"]))
      self.interval.restart_clock()  # Keep eval time out of the training throughput.
    if analyse:
      diag, self.prev_signs = self.setup.diagnose(state[0], jnp.asarray(done),
                                                  self.prev_signs, call.probe())
      self.writer.write(dict(step=done, split="analysis", **diagnostics.to_floats(diag)))
    if checkpoint:
      self.save(done, state)
    bar.exclude(time.perf_counter() - started)


def final_report(plan: Plan, setup: Setup, state: nnx.State, train_seconds: float,
                 workdir: str) -> dict:
  """Evaluates the final state; writes and returns ``final_metrics.json``."""
  c = plan.config
  final_eval = evaluate_setup(setup, state[0], c)
  final = dict(test_accuracy=final_eval["accuracy"], test_loss=final_eval["loss"],
               test_examples=final_eval["count"], train_steps=plan.total_steps,
               train_seconds=train_seconds, params_fingerprint=params_fingerprint(state[0]),
               model=c.model.name, seed=c.seed, conv_impl=setup.conv_impl)
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(os.path.join(workdir, "final_metrics.json"), final)
  return final


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       step_hook: Callable[[int], None] | None = None) -> dict:
  """Trains and evaluates ``config`` in ``workdir``, resuming from its latest checkpoint.

  Phases: :func:`prepare` (validate, resolve, check the workdir's run: a restart
  with another config stops here, the workdir untouched), the workdir lock (a second
  launch into a running workdir stops here), :func:`build`, :func:`restore`, then
  ``config.json``/``run.json`` are written, the loop (:class:`_Loop`), and
  :func:`final_report`.

  Args:
    config: an experiment config (``irnet_jax/configs/*.py``).
    workdir: output directory: ``checkpoints/``, ``metrics.jsonl``, ``tensorboard/``,
      ``final_metrics.json``, ``config.json``, ``run.json``.
    step_hook: called on the host with the number of completed steps after each device
      call (after any checkpoint of that step was started). An exception raised in it
      aborts the run like a crash; tests use it to simulate a kill.

  Returns:
    The final metrics (also written to ``final_metrics.json``).

  Raises:
    preemption.Preempted: SIGTERM/SIGINT arrived; a checkpoint of the reached step
      was written and the same call resumes.
  """
  plan = prepare(config, workdir)
  c, is_main = plan.config, jax.process_index() == 0
  with workdir_lib.WorkdirLock(workdir, jax.process_index()), \
      preemption.Preemption() as stop:
    setup = build(c, plan.devices, plan.steps_per_epoch, plan.total_steps)
    fingerprint = run_record.run_fingerprint(run_record.run_spec(c))
    ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                      c.keep_checkpoints)
    writer = None
    try:
      start = restore(c, setup, ckpt, fingerprint)
      writer = workdir_lib.MetricsWriter(workdir, is_main, tensorboard=c.tensorboard)
      if is_main:  # Only now that the workdir is known to hold this run (or none).
        run_record.record_run(workdir, c, plan.derived)
        writer.truncate_after(start.step)
      loop = _Loop(plan, setup, ckpt, writer, fingerprint, start, workdir)
      state = loop.run(start.state, step_hook, stop)
      train_seconds = loop.seconds()
    finally:
      ckpt.wait()
      ckpt.close()
      if writer is not None:
        writer.close()
    return final_report(plan, setup, state, train_seconds, workdir)
