"""Optimizers and learning-rate schedules of the recipes (optax), as functions of the
config: imported by the training step, the loop and ``irnet_jax.convert`` alike.

Every schedule is a function of the *optimizer* step (one per parameter update, not per
micro-batch when gradients are accumulated).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx


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


def make_optimizer(c: ml_collections.ConfigDict, schedule: optax.Schedule,
                   model: nnx.Module | None = None) -> optax.GradientTransformation:
  """SGD / Nesterov / Adam with torch-style L2 weight decay (added to the gradient).

  With ``optimizer.binary="bop"`` the binary kernels of ``model`` (needed then) get
  :func:`bop` (``optimizer.bop_threshold``, ``optimizer.bop_gamma``); start from
  :func:`sign_binary_kernels`. With ``optimizer.method_params="adam"`` (the default)
  the binarization method's own parameters (ReActNet's thresholds and RPReLU, see
  :func:`param_labels`) get Adam at ``optimizer.method_params_lr`` times the schedule's
  shape, without weight decay, as ReActNet trains them. Every other Param gets the
  optimizer of ``optimizer.name``."""
  o = c.optimizer
  if o.name == "adam":
    opt = optax.adam(schedule)
  else:
    opt = optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.name == "nesterov")
  if o.weight_decay:
    opt = optax.chain(optax.add_decayed_weights(o.weight_decay), opt)
  bop_on = o.get("binary", "") == "bop"
  if bop_on and model is None:
    raise ValueError("optimizer.binary='bop' needs the model (its binary kernels)")
  labels = param_labels(model) if model is not None else None
  method_on = (o.get("method_params", "adam") == "adam" and labels is not None
               and "method" in jax.tree.leaves(labels))
  if not (bop_on or method_on):
    return opt
  transforms = {"real": opt, "binary": opt, "method": opt}
  if bop_on:
    transforms["binary"] = bop(o.bop_threshold, o.bop_gamma)
  if method_on:
    ratio = o.get("method_params_lr", 5e-4) / o.learning_rate
    transforms["method"] = optax.adam(lambda step: schedule(step) * ratio)
  return optax.partition(transforms, labels)


# --- Bop: the latent-free binary optimizer ------------------------------------------

class BopState(NamedTuple):
  """State of :func:`bop`: the step (for schedules) and the gradient moving average."""
  count: jax.Array
  m: optax.Updates


def _larq_sign(x: jax.Array) -> jax.Array:
  # ``larq.math.sign``: sign(0) = +1 (never 0); NaN stays NaN so divergence shows.
  return jnp.sign(jnp.sign(x) + jnp.asarray(0.1, x.dtype))


def bop(threshold: float | optax.Schedule = 1e-8,
        gamma: float | optax.Schedule = 1e-4) -> optax.GradientTransformation:
  """Bop (Helwegen et al., NeurIPS 2019, "Latent Weights Do Not Exist"), as Larq's
  ``larq.optimizers.Bop`` (same defaults), as an optax transformation.

  Per element, with ``t`` the optimizer step (0 on the first update) and ``g`` the
  gradient, exactly as Larq's ``Bop._resource_apply_dense``::

    m <- m + gamma(t) * (g - m)                          # = (1-gamma) m + gamma g
    w <- larq_sign(-sign(w * m - threshold(t)) * w)      # larq_sign(0) = +1

  For ``w = +-1`` this flips ``w`` iff ``|m| > threshold`` and ``sign(m) == sign(w)``
  (the paper's Algorithm 1); otherwise it keeps ``w``. The returned updates are
  ``w_new - w``, so ``optax.apply_updates`` yields ``w_new`` and the transformation
  composes with ``optax.partition``/``chain``; there is no learning rate to scale.

  The weights are expected to be +-1. Real-valued weights (e.g. a He init) become
  ``sign(w)`` -- or ``-sign(w)`` where ``w * m > threshold`` -- after the first step,
  so Bop discards their magnitude; that step is exact only up to the rounding of
  ``w + (w_new - w)`` (float32: ``.3 + fl(-1.3) = -0.99999994``), so binarize the
  kernels (``where(w >= 0, 1, -1)``) before the first step. From +-1 every update
  (``0`` or ``-2w``) is exact. ``m`` has the parameters' dtype, like Larq's slot.
  """
  def init(params: optax.Params) -> BopState:
    return BopState(count=jnp.zeros([], jnp.int32),
                    m=jax.tree.map(jnp.zeros_like, params))

  def update(grads: optax.Updates, state: BopState, params: optax.Params | None = None
             ) -> tuple[optax.Updates, BopState]:
    if params is None:
      raise ValueError("bop needs params: the new weight is a function of the old")
    g_t = gamma(state.count) if callable(gamma) else gamma
    tau = threshold(state.count) if callable(threshold) else threshold
    m = jax.tree.map(
        lambda m, g: m + jnp.asarray(g_t, m.dtype) * (g.astype(m.dtype) - m),
        state.m, grads)
    def step(w, m):
      w_new = _larq_sign(-jnp.sign(w * m - jnp.asarray(tau, w.dtype)) * w)
      return w_new - w
    updates = jax.tree.map(step, params, m)
    return updates, BopState(count=optax.safe_increment(state.count), m=m)

  return optax.GradientTransformation(init, update)


def param_labels(model: nnx.Module) -> nnx.State:
  """``"binary"`` / ``"method"`` / ``"real"`` for every ``nnx.Param`` of ``model``, with
  the structure of ``nnx.state(model, nnx.Param)``: the labels of ``optax.partition``.

  Binary are the ``kernel`` Params of modules with a true ``binary_weights`` attribute
  (``layers.BinaryConv`` and any layer following that convention), i.e. the weights
  that the forward pass quantizes to +-1. Method are the Params a binarization method
  adds to a binary layer (``act_shift``, ``rprelu``: ReActNet's). All else
  (full-precision convolutions, BatchNorm, the classifier) is real.
  """
  binary, method = set(), set()
  for path, node in nnx.graph.iter_graph(model):
    if not isinstance(node, nnx.Module):
      continue
    if getattr(node, "binary_weights", False) and isinstance(getattr(node, "kernel", None),
                                                            nnx.Param):
      binary.add(tuple(path) + ("kernel",))
    for name in METHOD_PARAMS:
      if isinstance(getattr(node, name, None), (nnx.Param, nnx.Dict)):
        method.add(tuple(path) + (name,))

  def label(path, _):
    path = tuple(path)
    if path in binary:
      return "binary"
    return "method" if any(path[:len(m)] == m for m in method) else "real"
  return nnx.map_state(label, nnx.state(model, nnx.Param))


# The Params a method adds to a binary layer (irnet_jax.layers), by attribute name.
METHOD_PARAMS = ("act_shift", "rprelu")


def sign_binary_kernels(model: nnx.Module) -> None:
  """Sets every binary kernel (label ``binary`` of :func:`param_labels`) to ``where(w >= 0, 1, -1)``
  in place: Bop's weights are +-1 from the first step (see :func:`bop`)."""
  for _, node in nnx.graph.iter_graph(model):
    if getattr(node, "binary_weights", False) and isinstance(getattr(node, "kernel", None),
                                                            nnx.Param):
      w = node.kernel[...]
      node.kernel[...] = jnp.where(w >= 0, 1, -1).astype(w.dtype)


def bop_with(real_optimizer: optax.GradientTransformation, model: nnx.Module, *,
             threshold: float | optax.Schedule = 1e-8,
             gamma: float | optax.Schedule = 1e-4) -> optax.GradientTransformation:
  """Bop on the binary kernels of ``model``, ``real_optimizer`` on all other Params
  (Larq's ``CaseOptimizer(Bop.is_binary_variable, ...)``); for ``wrt=nnx.Param``."""
  return optax.partition({"binary": bop(threshold, gamma), "real": real_optimizer,
                          "method": real_optimizer}, param_labels(model))
