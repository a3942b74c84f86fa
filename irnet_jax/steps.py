"""The pure functions the launcher jits: one training step, K steps per device call,
the evaluation step and the diagnostics, as functions of ``(graphdef, config)``.

Design: ``graphdef, state = nnx.split((model, optimizer))`` once; every function here
takes and returns ``state`` (an ``nnx.State``), so ``jax.jit`` sees a pure function.
EDE's (t, k), the learning rate and every random draw are functions of the optimizer's
step counter read *inside* the step: one compilation for the whole run, and K steps in
one ``lax.scan`` give the parameters of K single steps.

A training batch is either what the host pipeline made, ``dict(image=uint8 (B, H, W, 3)
NHWC, label=int32 (B,))``, or, with the data held on the device
(``dataset.cache_on_device``), ``dict(index=int32 (B,))`` of rows of the resident
training set, which the step gathers and augments itself
(:func:`irnet_jax.data.device.augment`).
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from irnet_jax import binarize, data, diagnostics, ops
from irnet_jax.data import device as data_device

State = nnx.State
Batch = dict


def progress_at(c: ml_collections.ConfigDict, step: jax.Array, steps_per_epoch: int,
                total_steps: int) -> jax.Array:
  """EDE's training progress in [0, 1] at a (traced) step: per epoch like the official
  CIFAR code, or every ``ede.every_steps`` steps like the official ImageNet code."""
  step = step.astype(jnp.float32)
  if c.ede.schedule_by == "epoch":
    num_epochs = max(1, math.ceil(total_steps / steps_per_epoch))
    progress = jnp.floor(step / steps_per_epoch) / num_epochs
  else:
    every = c.ede.every_steps
    progress = jnp.floor(step / every) * every / max(total_steps, 1)
  return jnp.minimum(progress, 1.0)


def set_progress_at(c: ml_collections.ConfigDict, model: nnx.Module, step: jax.Array,
                    steps_per_epoch: int, total_steps: int) -> ops.EDE:
  """:func:`irnet_jax.binarize.set_progress` at ``step``: the one way (t, k) reach the
  binary layers of any model, registry or a user's; returns them (for the metrics)."""
  return binarize.set_progress(model, progress_at(c, step, steps_per_epoch, total_steps),
                               c.ede.t_min, c.ede.t_max)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example softmax cross-entropy in float32; logits (N, C), labels (N,) int."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def _micro_batches(x: jax.Array, count: int) -> jax.Array:
  """``(B, ...) -> (count, B / count, ...)``, micro-batch ``a`` = rows ``a, a + count, ...``.

  Strided rather than contiguous so that every micro-batch keeps its share of rows on
  every device of the data axis (a contiguous split would put micro-batch 0 on the
  first devices only)."""
  return x.reshape((x.shape[0] // count, count) + x.shape[1:]).swapaxes(0, 1)


def _gradients(model: nnx.Module, images: jax.Array, labels: jax.Array, accumulate: int
               ) -> tuple[jax.Array, jax.Array, State]:
  """``(mean loss, accuracy, gradients of the mean loss)`` over the batch.

  With ``accumulate = A > 1`` the batch runs as A micro-batches in a ``lax.scan``
  (activations of one micro-batch alive at a time) and the gradients are averaged;
  BatchNorm normalizes each micro-batch with its own statistics and updates its running
  averages A times, as A forward passes of B / A images would in PyTorch.
  """

  def loss_fn(m, x, y):
    logits = m(x)
    loss = cross_entropy(logits, y).mean()
    return loss, jnp.mean(jnp.argmax(logits, -1) == y)

  grad_fn = nnx.value_and_grad(loss_fn, has_aux=True)
  if accumulate == 1:
    (loss, accuracy), grads = grad_fn(model, images, labels)
    return loss, accuracy, grads

  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  # Pure functions of the state pytrees (not of the module): the scan body traces at
  # its own level, where NNX cannot reach modules made outside it.
  def micro_loss(params, rest, x, y):
    # Fresh Variables at this trace level (the BatchStats are written to).
    m = nnx.merge(graphdef, params, jax.tree.map(lambda v: v, rest))
    loss, accuracy = loss_fn(m, x, y)
    return loss, (accuracy, nnx.split(m, nnx.Param, ...)[2])

  def micro(carry, xy):
    rest, total = carry
    (loss, (accuracy, rest)), g = jax.value_and_grad(micro_loss, has_aux=True)(
        params, rest, *xy)
    return (rest, jax.tree.map(jnp.add, total, g)), (loss, accuracy)

  zeros = jax.tree.map(jnp.zeros_like, params)
  (rest, total), (losses, accuracies) = jax.lax.scan(
      micro, (rest, zeros), (_micro_batches(images, accumulate),
                             _micro_batches(labels, accumulate)))
  nnx.update(model, rest)  # BatchNorm running statistics after the last micro-batch.
  grads = jax.tree.map(lambda g: g / accumulate, total)
  return losses.mean(), accuracies.mean(), grads


def make_train_step(graphdef: nnx.GraphDef, c: ml_collections.ConfigDict,
                    schedule: optax.Schedule, steps_per_epoch: int, total_steps: int
                    ) -> Callable[[State, Batch], tuple[State, dict]]:
  """``step(state, batch) -> (state, metrics)``: one optimizer step, pure, for ``jax.jit``.

  ``batch["image"]`` is uint8 NHWC from the input pipeline (normalized, and
  colour-jittered when ``dataset.color_jitter_on="device"``, here) or already
  normalized floats (used as they are); or ``batch`` holds ``index`` and the resident
  ``train_image``/``train_label`` arrays (see the module docstring).
  ``config.grad_accum_steps`` micro-batches make one update (:func:`_gradients`).
  Metrics are float32 scalars: loss, accuracy, param_norm, lr, ede_t, ede_k (and
  bad_files with ``dataset.skip_bad_files``).
  """
  device_jitter = data.color_jitter_on(c.dataset) == "device"
  accumulate = int(c.get("grad_accum_steps", 1))
  ds = c.dataset

  def train_step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    step = optimizer.step[...]
    ede = set_progress_at(c, model, step, steps_per_epoch, total_steps)
    if "index" in batch:  # Resident data: gather this step's rows and augment them.
      images, labels = data_device.gather_train_batch(
          batch["train_image"], batch["train_label"], batch["index"], step, c.seed,
          ds.augment, ds.image_size)
    else:
      images, labels = batch["image"], batch["label"]
    jitter = data_device.jitter_key(c.seed, step) if device_jitter else None
    images = data_device.model_input(images, ds.mean, ds.std, jitter)
    loss, accuracy, grads = _gradients(model, images, labels, accumulate)
    optimizer.update(model, grads)
    metrics = dict(loss=loss, accuracy=accuracy,
                   param_norm=optax.tree.norm(nnx.state(model, nnx.Param)),
                   lr=jnp.asarray(schedule(step), jnp.float32), ede_t=ede.t, ede_k=ede.k)
    if "bad_files" in batch:  # dataset.skip_bad_files: replaced files in this batch.
      metrics["bad_files"] = jnp.sum(batch["bad_files"])
    return nnx.state((model, optimizer)), metrics

  return train_step


def scan_steps(train_step: Callable[[State, Batch], tuple[State, dict]]
               ) -> Callable[[State, Batch], tuple[State, dict]]:
  """``call(state, batches) -> (state, metrics)``: ``train_step`` over the leading axis
  of every array of ``batches`` (K stacked host batches, or K index sets), in one
  ``lax.scan``; metrics come back stacked, shape (K,). The step is the same function:
  the scan only repeats it, so K steps in a call equal K calls of one step."""

  def call(state, batches):
    return jax.lax.scan(train_step, state, batches)

  return call


def resident_step(train_step: Callable[[State, Batch], tuple[State, dict]]
                  ) -> Callable[[State, dict, jax.Array], tuple[State, dict]]:
  """``step(state, resident, index) -> (state, metrics)``: one step over resident data,
  ``resident = dict(train_image=uint8 (N, H, W, 3), train_label=int32 (N,))`` on the
  device(s), ``index`` int32 (B,) the rows of this step."""

  def step(state, resident, index):
    return train_step(state, dict(index=index, **resident))

  return step


def scan_resident_steps(train_step: Callable[[State, Batch], tuple[State, dict]]
                        ) -> Callable[[State, dict, jax.Array], tuple[State, dict]]:
  """``call(state, resident, indices) -> (state, metrics)``: :func:`resident_step` over
  ``indices`` int32 (K, B), one row per step, in one ``lax.scan``; metrics (K,)."""
  one = resident_step(train_step)

  def call(state, resident, indices):
    return jax.lax.scan(lambda s, index: one(s, resident, index), state, indices)

  return call


def dispatch_steps(step: Callable[..., tuple[State, dict]]) -> Callable[..., tuple[State,
                                                                                  dict]]:
  """The ``"dispatch"`` way to run a call: ``step`` (already jitted) once per row of the
  last argument (stacked batches or index rows), from the host; metrics stacked (K,).

  Same signature as the scanned call; bit for bit K single dispatched steps (not the
  scanned call's bits: XLA compiles a step in a loop body differently). Used
  where a step inside an XLA loop runs slower than the step alone (XLA:CPU: ~30% for
  ResNet-20, convolutions in a while loop are compiled differently) and a dispatch
  costs nothing next to the step (see :func:`irnet_jax.train.resolve_call_mode`)."""

  def call(state, *args):
    *fixed, stacked = args
    count = len(jax.tree.leaves(stacked)[0])
    rows = []
    for i in range(count):
      state, metrics = step(state, *fixed, jax.tree.map(lambda x, i=i: x[i], stacked))
      rows.append(metrics)
    return state, jax.tree.map(lambda *v: jnp.stack(v), *rows)

  return call


def make_eval_step(graphdef: nnx.GraphDef, dataset: ml_collections.ConfigDict
                   ) -> Callable[[State, Batch], dict]:
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


def scan_eval(eval_step: Callable[[State, Batch], dict]
              ) -> Callable[[State, Batch], dict]:
  """``evaluate(model_state, batches) -> sums`` over the leading axis of resident,
  padded test batches (``image`` (M, E, H, W, 3), ``label`` and ``mask`` (M, E)):
  a whole evaluation in one device call."""

  def evaluate(model_state, batches):
    def one(total, batch):
      return jax.tree.map(jnp.add, total, eval_step(model_state, batch)), None
    zero = dict(loss=0.0, correct=0.0, correct5=0.0, count=0.0)
    return jax.lax.scan(one, jax.tree.map(jnp.float32, zero), batches)[0]

  return evaluate


def make_weight_signs(graphdef: nnx.GraphDef) -> Callable[[State], dict]:
  """``signs(model_state) -> {layer: int8 HWIO}``: :func:`irnet_jax.diagnostics.
  weight_signs` of a model state (what :func:`make_diagnose` returns beside its
  metrics; the launcher checkpoints them for the flip ratios of a resumed run)."""
  return lambda model_state: diagnostics.weight_signs(nnx.merge(graphdef, model_state))


def make_diagnose(graphdef: nnx.GraphDef, c: ml_collections.ConfigDict,
                  steps_per_epoch: int, total_steps: int) -> Callable:
  """``(model_state, step, prev_signs, x) -> (metrics, signs)`` for jit: the compact
  information-retention diagnostics of :mod:`irnet_jax.diagnostics` at the step's EDE,
  next to the train step (one fused computation, no host loop over layers)."""

  def diagnose(model_state, step, prev_signs, x):
    model = nnx.merge(graphdef, model_state)  # Eval mode: BN statistics untouched.
    ede = set_progress_at(c, model, step, steps_per_epoch, total_steps)
    x = data_device.model_input(x, c.dataset.mean, c.dataset.std)
    metrics = diagnostics.measure(model, ede, prev_signs, x)
    return metrics, diagnostics.weight_signs(model)

  return diagnose
