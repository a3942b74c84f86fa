"""Optimizers and learning-rate schedules of the recipes (optax), as functions of the
config: imported by the training step, the loop and ``irnet_jax.convert`` alike.

Every schedule is a function of the *optimizer* step (one per parameter update, not per
micro-batch when gradients are accumulated).
"""
from __future__ import annotations

import math

import ml_collections
import optax


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
