"""irnet_jax.optim: the learning-rate schedules at their boundaries against hand-computed
values (torch ``CosineAnnealingLR`` ``lr/2 (1 + cos(pi e / E))``, never computed by the
code under test), and Bop (``optim.bop``) against Larq's update rule, worked out by hand,
and its use through ``optax.partition`` on an NNX model with a binary and a real layer."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from irnet_jax import checkpointing, optim, train
from irnet_jax import config as config_lib
from irnet_jax.layers import BinaryConv

# ------------------------------------------------------------------ learning rates


def _optimizer_config(**fields):
  c = config_lib.base_config()
  c.optimizer.update(fields)
  return c


def _lrs(c, steps, steps_per_epoch, total_steps):
  schedule = optim.learning_rate_schedule(c, steps_per_epoch, total_steps)
  return [float(schedule(jnp.asarray(s, jnp.int32))) for s in steps]


COS_45 = 0.5 * (1 + math.sqrt(0.5))   # (1 + cos(pi/4)) / 2 = 0.853553...
COS_135 = 0.5 * (1 - math.sqrt(0.5))  # (1 + cos(3 pi/4)) / 2 = 0.146447...


def test_lr_cosine_per_epoch():
  # torch CosineAnnealingLR(T_max=4) stepped once per epoch of 10 steps, lr 0.1.
  c = _optimizer_config(schedule="cosine_epoch", learning_rate=0.1)
  steps = [0, 9, 10, 19, 20, 29, 30, 39, 40]
  want = [0.1, 0.1, 0.1 * COS_45, 0.1 * COS_45, 0.05, 0.05, 0.1 * COS_135,
          0.1 * COS_135, 0.0]
  np.testing.assert_allclose(_lrs(c, steps, 10, 40), want, rtol=1e-6, atol=1e-9)


def test_lr_cosine_per_step():
  # optax cosine decay to 0 over 100 steps, lr 0.4: lr/2 (1 + cos(pi s / 100)).
  c = _optimizer_config(schedule="cosine", learning_rate=0.4)
  steps = [0, 1, 25, 50, 75, 100, 120]
  want = [0.4, 0.2 * (1 + math.cos(math.pi / 100)), 0.4 * COS_45, 0.2, 0.4 * COS_135,
          0.0, 0.0]
  np.testing.assert_allclose(_lrs(c, steps, 7, 100), want, rtol=1e-6, atol=1e-9)


def test_lr_constant():
  c = _optimizer_config(schedule="constant", learning_rate=0.03)
  np.testing.assert_allclose(_lrs(c, [0, 1, 99, 100, 1000], 10, 100), [0.03] * 5,
                             rtol=1e-7)


def test_lr_warmup_multistep_boundaries():
  # The ImageNet recipe scaled to 100 steps: linear 0.2 -> 0.8 over 25 steps
  # (0.2 + 0.024 s), then 0.8 x0.1 from step 30, 60, 90 (0.3/0.6/0.9 of 100).
  c = _optimizer_config(schedule="warmup_multistep", learning_rate=0.8,
              warmup_init_lr=0.2, warmup_steps=25,
              decay_fractions=(0.3, 0.6, 0.9), decay_factor=0.1)
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


# ------------------------------------------------------------------ Bop


def _run(tx, w, grads):
  """Apply ``tx`` for each gradient; the weights and moving averages after each step."""
  state = tx.init(w)
  ws, ms = [], []
  for g in grads:
    updates, state = tx.update(jnp.asarray(g, jnp.float32), state, w)
    w = optax.apply_updates(w, updates)
    ws.append(np.asarray(w))
    ms.append(np.asarray(state.m))
  return ws, ms, state


def test_hand_worked_example():
  # gamma = 0.5, threshold = 0.25; every number below is dyadic, so float32 is exact.
  # Larq: m <- m + gamma (g - m); w <- sign(-sign(w m - tau) w), i.e. for w = +-1 a
  # flip iff w m > tau.
  #   a: w=+1, g=1, 1, -1:     m=.5 (wm=.5 flip->-1), .75 (wm=-.75), -.125 (wm=.125<tau)
  #   b: w=-1, g=1, -.5, -2:   m=.5 (wm=-.5), 0 (wm=0), -1 (wm=1 flip->+1)
  #   c: w=+1, g=.25, .25, .5: m=.125, .1875 (agree but |m|<=tau), .34375 (flip->-1)
  #   d: w=-1, g=-1, 1, 1:     m=-.5 (wm=.5 flip->+1), .25 (wm=.25 not > tau),
  #                            .625 (wm=.625 flip->-1)
  w0 = jnp.array([1., -1., 1., -1.], jnp.float32)
  grads = [[1., 1., .25, -1.], [1., -.5, .25, 1.], [-1., -2., .5, 1.]]
  ws, ms, state = _run(optim.bop(threshold=0.25, gamma=0.5), w0, grads)
  np.testing.assert_array_equal(ms[0], [.5, .5, .125, -.5])
  np.testing.assert_array_equal(ms[1], [.75, 0., .1875, .25])
  np.testing.assert_array_equal(ms[2], [-.125, -1., .34375, .625])
  np.testing.assert_array_equal(ws[0], [-1., -1., 1., 1.])
  np.testing.assert_array_equal(ws[1], [-1., -1., 1., 1.])
  np.testing.assert_array_equal(ws[2], [-1., 1., -1., -1.])
  assert int(state.count) == 3


def test_updates_are_minus_two_w_on_flips():
  tx = optim.bop(threshold=0.25, gamma=0.5)
  w = jnp.array([1., -1., 1., -1.])
  updates, _ = tx.update(jnp.array([1., 1., .25, -1.]), tx.init(w), w)
  np.testing.assert_array_equal(updates, [-2., 0., 0., 2.])


def test_flips_iff_above_threshold_and_same_sign():
  # gamma = 1 makes m = g on the first step, so m is chosen directly.
  tau = 0.3
  m = jnp.array([-2., -.5, -.31, -.29, -.1, 0., .1, .29, .31, .5, 2.])
  tx = optim.bop(threshold=tau, gamma=1.0)
  for sign in (1., -1.):
    w = jnp.full_like(m, sign)
    new = optax.apply_updates(w, tx.update(m, tx.init(w), w)[0])
    flip = (jnp.abs(m) > tau) & (jnp.sign(m) == sign)  # the paper's Algorithm 1
    np.testing.assert_array_equal(new, jnp.where(flip, -w, w))
  # Random +-1 weights and averages, against the same rule.
  kw, km = jax.random.split(jax.random.key(0))
  w = jnp.where(jax.random.bernoulli(kw, 0.5, (1000,)), 1., -1.)
  m = jax.random.normal(km, (1000,))
  new = optax.apply_updates(w, tx.update(m, tx.init(w), w)[0])
  flip = (jnp.abs(m) > tau) & (jnp.sign(m) == jnp.sign(w))
  np.testing.assert_array_equal(new, jnp.where(flip, -w, w))
  assert 100 < int(flip.sum()) < 900


def test_larq_tie_and_real_valued_weights():
  tx = optim.bop(threshold=0.25, gamma=1.0)
  # Larq's sign(0) = +1: at w m == tau exactly, sign(w m - tau) = 0 and w becomes +1.
  w = jnp.array([-1., 1.])
  new = optax.apply_updates(w, tx.update(jnp.array([-.25, .25]), tx.init(w), w)[0])
  np.testing.assert_array_equal(new, [1., 1.])
  # Real-valued weights leave as sign(w), or -sign(w) where w m > tau.
  w = jnp.array([.3, -.2, .1, -4., 0.])
  g = jnp.array([1., 1., 1., -.1, 1.])  # w m: .3 (flip), -.2, .1, .4 (flip), 0
  state = tx.init(w)
  u, state = tx.update(g, state, w)
  new = optax.apply_updates(w, u)
  # .3 + fl(-1.3) rounds to -0.99999994 in float32: the first step from real
  # values is only good to one rounding (hence: binarize the kernels first).
  np.testing.assert_allclose(new, [-1., -1., 1., 1., 1.], rtol=0, atol=2.0**-23)
  new = optax.apply_updates(new, tx.update(jnp.zeros(5), state, new)[0])  # no flips
  np.testing.assert_array_equal(new, [-1., -1., 1., 1., 1.])


class _Tiny(nnx.Module):

  def __init__(self, rngs: nnx.Rngs):
    self.conv = BinaryConv(2, 4, 3, weight_quantizer="sign", act_bits=32, rngs=rngs)
    self.fp = BinaryConv(2, 2, 1, padding=0, weight_bits=32, act_bits=32, rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    y = self.conv(x) + self.fp(x).sum(-1, keepdims=True)
    return self.head(y.mean((1, 2)))


def test_partition_with_nnx_model():
  model = _Tiny(nnx.Rngs(0))
  labels = optim.param_labels(model)
  assert labels["conv"]["kernel"] == "binary"
  assert {labels["fp"]["kernel"], labels["head"]["kernel"], labels["head"]["bias"]} == {
      "real"}
  model.conv.kernel[...] = jnp.sign(model.conv.kernel[...])  # start on +-1
  lr, gamma = 0.1, 0.5
  opt = nnx.Optimizer(model, optim.bop_with(optax.sgd(lr), model, threshold=0.0,
                                            gamma=gamma), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (2, 5, 5, 2))
  loss_fn = lambda m: (m(x) ** 2).mean()
  k0, fp0, h0 = (np.asarray(v[...]) for v in (model.conv.kernel, model.fp.kernel,
                                               model.head.kernel))
  grads = nnx.grad(loss_fn)(model)
  opt.update(model, grads)
  k1 = np.asarray(model.conv.kernel[...])
  # Binary kernel: only sign flips, exactly where Bop's first step says (m = gamma g).
  flip = k0 * gamma * np.asarray(grads["conv"]["kernel"][...]) > 0
  np.testing.assert_array_equal(k1, np.where(flip, -k0, k0))
  assert 0 < flip.sum() < flip.size
  # Real Params: plain SGD.
  np.testing.assert_allclose(model.fp.kernel[...],
                             fp0 - lr * grads["fp"]["kernel"][...], rtol=1e-6)
  np.testing.assert_allclose(model.head.kernel[...],
                             h0 - lr * grads["head"]["kernel"][...], rtol=1e-6)
  for _ in range(3):  # stays binary under a jitted step
    nnx.jit(lambda m, o: o.update(m, nnx.grad(loss_fn)(m)))(model, opt)
  assert set(np.unique(model.conv.kernel[...])) <= {-1., 1.}


def test_jit_schedules_and_dtype():
  # gamma: .5 then .25; threshold: 10 (nothing flips) then 0.
  gamma = lambda t: jnp.where(t == 0, .5, .25)
  threshold = lambda t: jnp.where(t == 0, 10., 0.)
  tx = optim.bop(threshold=threshold, gamma=gamma)
  update = jax.jit(tx.update)
  w = jnp.array([1., -1., 1.], jnp.bfloat16)
  state = tx.init(w)
  g1 = jnp.array([1., 1., -1.], jnp.float32)
  u, state = update(g1, state, w)
  w = optax.apply_updates(w, u)
  assert u.dtype == w.dtype == state.m.dtype == jnp.bfloat16
  np.testing.assert_array_equal(state.m, [.5, .5, -.5])  # gamma(0) = .5
  np.testing.assert_array_equal(w, [1., -1., 1.])  # w m = .5 < threshold(0) = 10
  # m = m + .25 (g - m): .5 + .25 (1 - .5) = .625; .5 + .25 (-1.5) = .125;
  # -.5 + .25 (1.5) = -.125. w m = .625 (> threshold(1) = 0: flip), -.125, -.125.
  u, state = update(jnp.array([1., -1., 1.], jnp.float32), state, w)
  w = optax.apply_updates(w, u)
  np.testing.assert_array_equal(state.m, [.625, .125, -.125])
  np.testing.assert_array_equal(w, [-1., -1., 1.])
  assert int(state.count) == 2
  with pytest.raises(ValueError):
    tx.update(g1, state)


def test_launcher_trains_with_bop_on_the_binary_kernels(tmp_path, toy_npz, tiny_config):
  # optimizer.binary=bop: binary kernels start at +-1 and stay there (Bop flips them);
  # the full-precision stem and classifier move by SGD.
  c = tiny_config(toy_npz, **{
      "optimizer.binary": "bop", "optimizer.bop_gamma": 1e-2, "optimizer.bop_threshold": 1e-6,
      "model.weight_quantizer": "sign", "num_train_steps": 8})
  train.train_and_evaluate(c, str(tmp_path / "run"))
  model, recorded = checkpointing.load_model(str(tmp_path / "run"))
  start = config_lib.build_model(recorded)  # The same seed: the initial weights.
  kernel = np.asarray(model.layer1[0].conv1.kernel[...])
  assert set(np.unique(kernel)) == {-1.0, 1.0}
  assert np.any(kernel != np.where(np.asarray(start.layer1[0].conv1.kernel[...]) >= 0, 1, -1))
  assert not np.allclose(model.conv1.kernel[...], start.conv1.kernel[...])


# ------------------------------------------------------------ a method's own parameters


def test_reactnet_thresholds_and_rprelu_get_adam_without_decay():
  """ReActNet's thresholds and RPReLU (label "method") take Adam's first step, -lr*sign(g)
  (no weight decay), while the kernel takes SGD's -lr*(g + wd*w); "same" gives every
  Param the SGD step."""
  def one_step(method_params):
    conv = BinaryConv(2, 3, 3, padding=1, weight_quantizer="mean_abs_detached",
                      estimator="approx_sign", act_threshold=True, rprelu=True,
                      rngs=nnx.Rngs(0))
    conv.act_shift[...] = jnp.asarray([0.3, -0.2])
    labels = optim.param_labels(conv)
    assert labels["kernel"] == "binary"
    assert labels["act_shift"] == "method"
    assert {labels["rprelu"][k] for k in ("shift_in", "slope", "shift_out")} == {"method"}
    c = _optimizer_config(schedule="constant", momentum=0.0, weight_decay=0.01,
                          method_params=method_params, method_params_lr=1e-3)
    opt = nnx.Optimizer(conv, optim.make_optimizer(c, optax.constant_schedule(0.1), conv),
                        wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(2), (2, 5, 5, 2))
    params = lambda: jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(conv, nnx.Param)))
    before = params()
    grads = nnx.grad(lambda m: (jnp.sin(m(x)) ** 2).sum())(conv)
    opt.update(conv, grads)
    return before, jax.tree.map(np.array, nnx.to_pure_dict(grads)), params()

  before, g, after = one_step("adam")
  shift0, shift1, gs = (s["act_shift"] for s in (before, after, g))
  assert np.all(np.abs(gs) > 1e-3)
  np.testing.assert_allclose(shift1 - shift0, -1e-3 * np.sign(gs), rtol=1e-4)
  k0, k1, gk = (s["kernel"] for s in (before, after, g))
  np.testing.assert_allclose(k1 - k0, -0.1 * (gk + 0.01 * k0), rtol=1e-4, atol=1e-7)
  before, g, after = one_step("same")
  shift0, shift1, gs = (s["act_shift"] for s in (before, after, g))
  np.testing.assert_allclose(shift1 - shift0, -0.1 * (gs + 0.01 * shift0), rtol=1e-4)
