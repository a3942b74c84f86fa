"""EDE (t, k) and learning-rate schedules at their boundaries, against hand-computed values.

Every expected number is written out here (from the formulas of the README and the
official code: EDE ``t = 10^(log10 t_min + (log10 t_max - log10 t_min) * progress)``,
``k = max(1/t, 1)``; torch ``CosineAnnealingLR`` ``lr/2 (1 + cos(pi e / E))``),
never computed by the code under test.
"""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from irnet_jax import config as config_lib
from irnet_jax import ops, optim, steps


def _config(**fields):
  c = config_lib.base_config()
  for key, value in fields.items():
    section, leaf = key.split("__")
    c[section][leaf] = value
  return c


def _ede(c, step, steps_per_epoch, total_steps):
  progress = steps.progress_at(c, jnp.asarray(step, jnp.int32), steps_per_epoch, total_steps)
  ede = ops.ede_schedule(progress, c.ede.t_min, c.ede.t_max)
  return float(ede.t), float(ede.k)


# ------------------------------------------------------------------ EDE per epoch

# 20 steps of 5 per epoch = 4 epochs; t from 1e-3 to 10 (4 decades): one decade per
# epoch, constant within an epoch, and t_max is reached only after the last epoch
# (the official CIFAR trainer sets t at the start of each epoch 0..epochs-1).
EDE_PER_EPOCH = [
    (0, 1e-3, 1000.0), (4, 1e-3, 1000.0),      # epoch 0, first and last step
    (5, 1e-2, 100.0), (9, 1e-2, 100.0),        # epoch 1
    (10, 1e-1, 10.0), (14, 1e-1, 10.0),        # epoch 2
    (15, 1.0, 1.0), (19, 1.0, 1.0),            # epoch 3 (k = max(1/t, 1) = 1)
    (20, 10.0, 1.0), (27, 10.0, 1.0),          # past the end: clamped to t_max
]


@pytest.mark.parametrize("step,t,k", EDE_PER_EPOCH)
def test_ede_per_epoch(step, t, k):
  c = _config(ede__schedule_by="epoch", ede__t_min=1e-3, ede__t_max=10.0)
  got_t, got_k = _ede(c, step, steps_per_epoch=5, total_steps=20)
  np.testing.assert_allclose([got_t, got_k], [t, k], rtol=2e-6)


def test_ede_per_epoch_partial_last_epoch():
  # 10 steps of 4 per epoch: ceil(10 / 4) = 3 epochs; t_min 0.1 -> t_max 10 (2 decades),
  # so epoch e has t = 10^(-1 + 2 e / 3). Steps 8 and 9 are the short epoch 2.
  c = _config(ede__schedule_by="epoch", ede__t_min=0.1, ede__t_max=10.0)
  for step, t in [(3, 0.1), (4, 10 ** (-1 / 3)), (7, 10 ** (-1 / 3)),
                  (8, 10 ** (1 / 3)), (9, 10 ** (1 / 3))]:
    got_t, got_k = _ede(c, step, steps_per_epoch=4, total_steps=10)
    np.testing.assert_allclose([got_t, got_k], [t, max(1 / t, 1.0)], rtol=2e-6,
                               err_msg=f"step {step}")


# ------------------------------------------------------------------ EDE per N steps

# The ImageNet recipe: progress = floor(step / 10) * 10 / total, refreshed every 10
# steps; 100 steps, t from 0.1 to 10 (2 decades): t = 10^(-1 + 2 progress).
EDE_EVERY_10 = [
    (0, 0.1, 10.0), (9, 0.1, 10.0),
    (10, 10 ** -0.8, 10 ** 0.8), (19, 10 ** -0.8, 10 ** 0.8),   # 0.158489..., 6.309573...
    (49, 10 ** -0.2, 10 ** 0.2),                                # progress 0.4
    (50, 1.0, 1.0),
    (99, 10 ** 0.8, 1.0),                                       # 6.309573...
    (100, 10.0, 1.0), (130, 10.0, 1.0),
]


@pytest.mark.parametrize("step,t,k", EDE_EVERY_10)
def test_ede_every_n_steps(step, t, k):
  c = _config(ede__schedule_by="step", ede__every_steps=10, ede__t_min=0.1, ede__t_max=10.0)
  got_t, got_k = _ede(c, step, steps_per_epoch=7, total_steps=100)  # epochs are ignored
  np.testing.assert_allclose([got_t, got_k], [t, k], rtol=2e-6)


def test_ede_every_step():
  # every_steps=1: progress = step / total; 40 steps, 1e-3 -> 10: t = 10^(-3 + step / 10).
  c = _config(ede__schedule_by="step", ede__every_steps=1, ede__t_min=1e-3, ede__t_max=10.0)
  for step, t in [(0, 1e-3), (1, 10 ** -2.9), (15, 10 ** -1.5), (30, 1.0), (31, 10 ** 0.1)]:
    got_t, got_k = _ede(c, step, steps_per_epoch=4, total_steps=40)
    np.testing.assert_allclose([got_t, got_k], [t, max(1 / t, 1.0)], rtol=2e-6,
                               err_msg=f"step {step}")


# ------------------------------------------------------------------ learning rates


def _lrs(c, steps, steps_per_epoch, total_steps):
  schedule = optim.learning_rate_schedule(c, steps_per_epoch, total_steps)
  return [float(schedule(jnp.asarray(s, jnp.int32))) for s in steps]


COS_45 = 0.5 * (1 + math.sqrt(0.5))   # (1 + cos(pi/4)) / 2 = 0.853553...
COS_135 = 0.5 * (1 - math.sqrt(0.5))  # (1 + cos(3 pi/4)) / 2 = 0.146447...


def test_lr_cosine_per_epoch():
  # torch CosineAnnealingLR(T_max=4) stepped once per epoch of 10 steps, lr 0.1.
  c = _config(optimizer__schedule="cosine_epoch", optimizer__learning_rate=0.1)
  steps = [0, 9, 10, 19, 20, 29, 30, 39, 40]
  want = [0.1, 0.1, 0.1 * COS_45, 0.1 * COS_45, 0.05, 0.05, 0.1 * COS_135,
          0.1 * COS_135, 0.0]
  np.testing.assert_allclose(_lrs(c, steps, 10, 40), want, rtol=1e-6, atol=1e-9)


def test_lr_cosine_per_step():
  # optax cosine decay to 0 over 100 steps, lr 0.4: lr/2 (1 + cos(pi s / 100)).
  c = _config(optimizer__schedule="cosine", optimizer__learning_rate=0.4)
  steps = [0, 1, 25, 50, 75, 100, 120]
  want = [0.4, 0.2 * (1 + math.cos(math.pi / 100)), 0.4 * COS_45, 0.2, 0.4 * COS_135,
          0.0, 0.0]
  np.testing.assert_allclose(_lrs(c, steps, 7, 100), want, rtol=1e-6, atol=1e-9)


def test_lr_constant():
  c = _config(optimizer__schedule="constant", optimizer__learning_rate=0.03)
  np.testing.assert_allclose(_lrs(c, [0, 1, 99, 100, 1000], 10, 100), [0.03] * 5,
                             rtol=1e-7)


def test_lr_warmup_multistep_boundaries():
  # The ImageNet recipe scaled to 100 steps: linear 0.2 -> 0.8 over 25 steps
  # (0.2 + 0.024 s), then 0.8 x0.1 from step 30, 60, 90 (0.3/0.6/0.9 of 100).
  c = _config(optimizer__schedule="warmup_multistep", optimizer__learning_rate=0.8,
              optimizer__warmup_init_lr=0.2, optimizer__warmup_steps=25,
              optimizer__decay_fractions=(0.3, 0.6, 0.9), optimizer__decay_factor=0.1)
  want = {0: 0.2, 1: 0.224, 12: 0.488, 24: 0.776, 25: 0.8, 29: 0.8, 30: 0.08, 59: 0.08,
          60: 0.008, 89: 0.008, 90: 0.0008, 99: 0.0008}
  got = _lrs(c, list(want), 10, 100)
  np.testing.assert_allclose(got, list(want.values()), rtol=1e-6)


def test_lr_imagenet_config_boundaries():
  # The imagenet_resnet18 recipe as shipped: 62,500 steps, warm-up 2,500 from 0.2 to
  # 0.8, x0.1 at 18,750 / 37,500 / 56,250.
  c = config_lib.imagenet_config("resnet18")
  want = {0: 0.2, 1250: 0.5, 2499: 0.2 + 0.6 * 2499 / 2500, 2500: 0.8, 18749: 0.8,
          18750: 0.08, 37499: 0.08, 37500: 0.008, 56249: 0.008, 56250: 0.0008,
          62499: 0.0008}
  got = _lrs(c, list(want), 625, 62500)
  np.testing.assert_allclose(got, list(want.values()), rtol=1e-6)


# ------------------------------------------------------------------ the EDE schedule field


def test_ede_schedule_by_is_a_plain_field():
  # `ede.update` was a ConfigDict method name: `c.ede.update == "epoch"` was always False.
  c = config_lib.base_config()
  assert c.ede.schedule_by == "epoch"
  assert config_lib.imagenet_config("resnet18").ede.schedule_by == "step"
  assert "update" not in c.ede

