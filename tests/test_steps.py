"""irnet_jax.steps: the EDE schedule (progress_at) at its boundaries, gradient
accumulation, K steps per call, the resident-data step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from irnet_jax import config as config_lib
from irnet_jax import ops, optim, steps, train
from irnet_jax.data import augment as aug
from irnet_jax.data import device as data_device


class _NoBatchNorm(nnx.Module):
  """A small conv net without BatchNorm: its gradient is a mean over examples, so
  micro-batches must reproduce the full batch's update."""

  def __init__(self, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.conv(x)).mean(axis=(1, 2)))


def _config(accumulate: int, schedule: str = "cosine"):
  c = config_lib.base_config()
  c.grad_accum_steps = accumulate
  c.optimizer.schedule = schedule
  c.ede.schedule_by = "step"
  c.dataset.augment = "none"
  return c


def _step(c, total_steps=10):
  model = _NoBatchNorm(nnx.Rngs(0))
  schedule = optim.learning_rate_schedule(c, 5, total_steps)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(c, schedule), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  return jax.jit(steps.make_train_step(graphdef, c, schedule, 5, total_steps)), state


def _batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.integers(0, 256, (n, 6, 6, 3)), jnp.uint8),
          "label": jnp.asarray(rng.integers(0, 4, n), jnp.int32)}


def test_accumulated_micro_batches_equal_one_large_batch():
  whole_step, state = _step(_config(1))
  accum_step, state2 = _step(_config(4))
  batch = _batch(16)
  for _ in range(3):  # Momentum and the schedule carry over steps.
    state, m1 = whole_step(state, batch)
    state2, m4 = accum_step(state2, batch)
  np.testing.assert_allclose(m1["loss"], m4["loss"], rtol=1e-5)
  np.testing.assert_allclose(m1["accuracy"], m4["accuracy"])
  for a, b in zip(jax.tree.leaves(nnx.state(state[0], nnx.Param)),
                  jax.tree.leaves(nnx.state(state2[0], nnx.Param))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
  # The counter, and with it the lr and EDE schedules, count optimizer steps.
  assert int(state2[1]["step"][...]) == 3
  assert m4["lr"] == m1["lr"] == optax.cosine_decay_schedule(0.1, 10)(2)
  assert m4["ede_t"] == m1["ede_t"]


def test_accumulation_updates_batchnorm_once_per_micro_batch():
  # With A micro-batches a BatchNorm layer normalizes each with its own statistics and
  # moves its running averages A times per step: as A forward passes over the strided
  # micro-batches (rows a, a + A, ...) of a model whose parameters do not change.
  c = _config(2)
  c.model.num_classes, c.dataset.image_size = 4, 8
  model = config_lib.build_model(c, conv_impl="xla")
  schedule = optim.learning_rate_schedule(c, 5, 10)
  optimizer = nnx.Optimizer(model, optim.make_optimizer(c, schedule), wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  step = jax.jit(steps.make_train_step(graphdef, c, schedule, 5, 10))
  images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (8, 8, 8, 3)), jnp.uint8)
  new_state, _ = step(jax.tree.map(jnp.copy, state), {"image": images,
                                                      "label": jnp.zeros(8, jnp.int32)})
  reference, _ = nnx.merge(graphdef, state)
  x = data_device.model_input(images, c.dataset.mean, c.dataset.std)
  steps.set_progress_at(c, reference, jnp.asarray(0), 5, 10)
  reference(x[0::2])
  reference(x[1::2])
  # bn1 follows the full-precision first conv: its statistics see the parameters only.
  np.testing.assert_allclose(new_state[0]["bn1"]["mean"][...], reference.bn1.mean[...],
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(new_state[0]["bn1"]["var"][...], reference.bn1.var[...],
                             rtol=1e-5, atol=1e-7)


def test_bad_accumulation_is_a_config_error():
  c = _config(3)
  with pytest.raises(ValueError, match="grad_accum_steps=3"):
    config_lib.validate(c, 1)  # 128 images do not split into 3 micro-batches.
  c = _config(2)
  config_lib.validate(c, 4)  # 128 = 2 x 4 x 16.


def test_scan_and_dispatch_of_k_steps_are_k_single_steps():
  c = _config(1)
  model = _NoBatchNorm(nnx.Rngs(0))
  schedule = optim.learning_rate_schedule(c, 5, 10)
  graphdef, state = nnx.split((model, nnx.Optimizer(model, optim.make_optimizer(c, schedule),
                                                     wrt=nnx.Param)))
  raw = steps.make_train_step(graphdef, c, schedule, 5, 10)
  step = jax.jit(raw)
  batches = [_batch(8, seed) for seed in range(4)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *batches)
  singles = jax.tree.map(jnp.copy, state)
  for b in batches:
    singles, m = step(singles, b)
  for call in (jax.jit(steps.scan_steps(raw)), steps.dispatch_steps(step)):
    out, ms = call(jax.tree.map(jnp.copy, state), stacked)
    assert ms["loss"].shape == (4,) and int(out[1]["step"][...]) == 4
    np.testing.assert_allclose(ms["loss"][-1], m["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(singles), jax.tree.leaves(out)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # The schedules read the step counter inside the scan: lr falls step by step.
  lrs = jax.jit(steps.scan_steps(raw))(jax.tree.map(jnp.copy, state), stacked)[1]["lr"]
  np.testing.assert_allclose(lrs, [schedule(i) for i in range(4)], rtol=1e-6)


# ------------------------------------------------------------------ the EDE schedule
#
# progress_at against hand-computed (t, k), from the formulas of the README and the
# official code: t = 10^(log10 t_min + (log10 t_max - log10 t_min) * progress),
# k = max(1/t, 1); every expected number is written out, never computed by the code
# under test.


def _ede_config(**fields):
  c = config_lib.base_config()
  c.ede.update(fields)
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
  c = _ede_config(schedule_by="epoch", t_min=1e-3, t_max=10.0)
  got_t, got_k = _ede(c, step, steps_per_epoch=5, total_steps=20)
  np.testing.assert_allclose([got_t, got_k], [t, k], rtol=2e-6)


def test_ede_per_epoch_partial_last_epoch():
  # 10 steps of 4 per epoch: ceil(10 / 4) = 3 epochs; t_min 0.1 -> t_max 10 (2 decades),
  # so epoch e has t = 10^(-1 + 2 e / 3). Steps 8 and 9 are the short epoch 2.
  c = _ede_config(schedule_by="epoch", t_min=0.1, t_max=10.0)
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
  c = _ede_config(schedule_by="step", every_steps=10, t_min=0.1, t_max=10.0)
  got_t, got_k = _ede(c, step, steps_per_epoch=7, total_steps=100)  # epochs are ignored
  np.testing.assert_allclose([got_t, got_k], [t, k], rtol=2e-6)


def test_ede_every_step():
  # every_steps=1: progress = step / total; 40 steps, 1e-3 -> 10: t = 10^(-3 + step / 10).
  c = _ede_config(schedule_by="step", every_steps=1, t_min=1e-3, t_max=10.0)
  for step, t in [(0, 1e-3), (1, 10 ** -2.9), (15, 10 ** -1.5), (30, 1.0), (31, 10 ** 0.1)]:
    got_t, got_k = _ede(c, step, steps_per_epoch=4, total_steps=40)
    np.testing.assert_allclose([got_t, got_k], [t, max(1 / t, 1.0)], rtol=2e-6,
                               err_msg=f"step {step}")


# ------------------------------------------------------------------ uint8 batches
#
# The jitted steps of train.build (what the launcher runs) on uint8 host batches.

MEAN = (0.25, 0.5, 0.75)
STD = (0.5, 0.25, 0.125)


def _train_config(**dataset):
  c = config_lib.base_config()
  fields = dict(name="digits", augment="none", image_size=16, mean=MEAN,
                std=STD)
  fields.update(dataset)
  c.dataset.update(fields)
  c.model.name, c.model.num_classes = "resnet20", 10
  c.batch_size = 8
  return c


@pytest.mark.slow
def test_steps_normalize_uint8_on_device():
  c = _train_config()
  setup = train.build(c, jax.devices()[:1], 10, 20)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 16, 16, 3), np.uint8)
  labels = rng.integers(0, 10, 8).astype(np.int32)
  floats = aug.normalize(images, MEAN, STD)  # The old host path.
  state_u8, m_u8 = setup.train_step(jax.tree.map(jnp.copy, setup.state),
                                    {"image": images, "label": labels})
  state_f, m_f = setup.train_step(jax.tree.map(jnp.copy, setup.state),
                                  {"image": floats, "label": labels})
  np.testing.assert_allclose(m_u8["loss"], m_f["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_u8), jax.tree.leaves(state_f)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  mask = np.ones(8, bool)
  e_u8 = setup.eval_step(state_u8[0], {"image": images, "label": labels,
                                       "mask": mask})
  e_f = setup.eval_step(state_u8[0], {"image": floats, "label": labels,
                                      "mask": mask})
  np.testing.assert_allclose(e_u8["loss"], e_f["loss"], rtol=1e-5)


@pytest.mark.slow
def test_train_step_device_jitter_one_compilation():
  c = _train_config(augment="imagenet", color_jitter_on="device")
  setup = train.build(c, jax.devices()[:1], 10, 20)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 16, 16, 3), np.uint8),
           "label": rng.integers(0, 10, 8).astype(np.int32),
           "bad_files": np.array([0, 1, 0, 0, 0, 0, 1, 0], np.int32)}
  initial = jax.tree.map(jnp.copy, setup.state)
  state = setup.train_step(setup.state, batch)[0]
  for _ in range(2):
    state, metrics = setup.train_step(state, batch)
  assert setup.train_step._cache_size() == 1  # Jitter keyed by the traced step.
  assert int(metrics["bad_files"]) == 2
  # A rerun from the same state draws the same jitter (same loss).
  again = [setup.train_step(jax.tree.map(jnp.copy, initial), batch)[1]["loss"]
           for _ in range(2)]
  assert float(again[0]) == float(again[1])
