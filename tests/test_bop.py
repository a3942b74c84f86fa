"""Bop (``irnet_jax.optim.bop``) against Larq's update rule, worked out by hand, and its
use through ``optax.partition`` on an NNX model with a binary and a real layer."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from irnet_jax import optim
from irnet_jax.layers import BinaryConv


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
  labels = optim.binary_weight_labels(model)
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
  from irnet_jax import checkpointing, config as config_lib, train
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
