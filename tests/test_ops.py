"""Tests of the pure binarization ops: forward values, custom gradients, Libra-PB."""
import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irnet_jax import ops


def test_sign_forward_values_incl_zero():
  x = jnp.array([-2.0, -1e-30, 0.0, 1e-30, 3.0])
  expected = np.array([-1.0, -1.0, 0.0, 1.0, 1.0])  # torch.sign semantics: sign(0) = 0
  for fn in (lambda v: ops.ede_sign(v, 0.5, 2.0), ops.ste_sign, ops.approx_sign):
    np.testing.assert_array_equal(fn(x), expected)


def test_ede_backward_matches_formula_and_autodiff_of_surrogate(x64):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(64,)) * 2)
  g = jnp.asarray(rng.normal(size=(64,)))
  for t, k in [(0.1, 10.0), (1.0, 1.0), (3.7, 1.0)]:
    t, k = jnp.float64(t), jnp.float64(k)
    _, vjp = jax.vjp(lambda v: ops.ede_sign(v, t, k), x)
    (got,) = vjp(g)
    assert got.dtype == jnp.float64
    formula = g * k * t * (1 - jnp.tanh(t * x) ** 2)
    np.testing.assert_allclose(got, formula, rtol=0, atol=1e-12)
    # The EDE is exactly the derivative of the smooth surrogate k * tanh(t x).
    _, vjp_s = jax.vjp(lambda v: k * jnp.tanh(t * v), x)
    np.testing.assert_allclose(got, vjp_s(g)[0], rtol=0, atol=1e-12)


def test_ede_hand_points():
  # d/dx at 0 is k * t; far from 0 it vanishes; t and k get zero cotangents.
  grad = jax.grad(lambda v, t, k: ops.ede_sign(v, t, k).sum(), argnums=(0, 1, 2))
  gx, gt, gk = grad(jnp.zeros(3), 0.3, 3.3)
  np.testing.assert_allclose(gx, 0.3 * 3.3, rtol=1e-6)
  assert gt == 0 and gk == 0
  gx_far = jax.grad(lambda v: ops.ede_sign(v, 10.0, 1.0).sum())(jnp.array([5.0]))
  assert float(gx_far[0]) < 1e-20


def test_ede_schedule_endpoints_and_k():
  e0 = ops.ede_schedule(0.0, t_min=0.1, t_max=10.0)
  np.testing.assert_allclose([e0.t, e0.k], [0.1, 10.0], rtol=1e-6)
  e_half = ops.ede_schedule(0.5, t_min=0.1, t_max=10.0)
  np.testing.assert_allclose([e_half.t, e_half.k], [1.0, 1.0], rtol=1e-6)
  e_late = ops.ede_schedule(0.9, t_min=1e-3, t_max=10.0)
  np.testing.assert_allclose(e_late.t, 10 ** (-3 + 4 * 0.9), rtol=1e-5)
  assert float(e_late.k) == 1.0  # k = max(1/t, 1)
  e_early = ops.ede_schedule(0.1, t_min=1e-3, t_max=10.0)
  np.testing.assert_allclose(e_early.k, 1 / e_early.t, rtol=1e-6)


def test_ste_and_approx_sign_gradients():
  x = jnp.array([-1.5, -1.0, -0.5, 0.0, 0.25, 1.0, 2.0])
  np.testing.assert_array_equal(jax.grad(lambda v: ops.ste_sign(v).sum())(x),
                                [0, 1, 1, 1, 1, 1, 0])
  np.testing.assert_allclose(jax.grad(lambda v: ops.approx_sign(v).sum())(x),
                             [0, 0, 1, 2, 1.5, 0, 0])


def _entropy_bits(b):
  p = float(jnp.mean(b > 0))
  return 0.0 if p in (0.0, 1.0) else -(p * np.log2(p) + (1 - p) * np.log2(1 - p))


def test_libra_pb_standardization_scale_and_entropy():
  rng = np.random.default_rng(1)
  kernel = jnp.asarray(rng.normal(0.3, 2.0, size=(3, 3, 16, 8)), jnp.float32)
  w_std = ops.standardize(kernel)
  np.testing.assert_allclose(w_std.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(w_std.std(axis=(0, 1, 2), ddof=1), 1, atol=1e-5)
  q = ops.libra_pb(kernel)
  scales = jnp.abs(q).max(axis=(0, 1, 2))
  # Every output channel is +-scale with scale a power of two (here 2^round(log2 0.8) = 1).
  np.testing.assert_array_equal(jnp.abs(q), jnp.broadcast_to(scales, q.shape))
  np.testing.assert_array_equal(jnp.log2(scales), jnp.round(jnp.log2(scales)))
  expected = 2.0 ** np.round(np.log2(np.abs(np.asarray(w_std)).mean(axis=(0, 1, 2))))
  np.testing.assert_array_equal(scales, expected)
  for c in range(8):
    assert _entropy_bits(q[..., c]) > 0.97  # balanced signs: ~1 bit per weight


def test_libra_pb_gradient_flows_through_mean_and_std(x64):
  rng = np.random.default_rng(2)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 4, 5)))
  g = jnp.asarray(rng.normal(size=kernel.shape))
  ede = ops.EDE(jnp.float64(0.7), jnp.float64(1.5))
  grad = jax.grad(lambda w: jnp.sum(ops.libra_pb(w, ede) * g))(kernel)
  # Reference: autodiff of the smooth surrogate k*tanh(t*standardize(w)) * const scale.
  scale = ops.libra_scale(ops.standardize(kernel))
  surrogate = lambda w: jnp.sum(ede.k * jnp.tanh(ede.t * ops.standardize(w)) * scale * g)
  ref = jax.grad(surrogate)(kernel)
  np.testing.assert_allclose(grad, ref, rtol=0, atol=1e-12)
  # Gradient through the mean: each channel's gradient sums to zero.
  np.testing.assert_allclose(grad.sum(axis=(0, 1, 2)), 0, atol=1e-12)


def test_quantizer_and_estimator_dispatch():
  k = jnp.asarray(np.random.default_rng(3).normal(size=(3, 3, 2, 4)), jnp.float32)
  np.testing.assert_array_equal(ops.quantize_weights(k, "sign"), jnp.sign(k))
  np.testing.assert_array_equal(ops.quantize_weights(k, "none"), k)
  with pytest.raises(ValueError, match="unknown weight quantizer"):
    ops.quantize_weights(k, "xnor")
  with pytest.raises(ValueError, match="unknown estimator"):
    ops.binarize(k, "magic")


def test_one_trace_while_t_and_k_change():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(x, progress):
    ede = ops.ede_schedule(progress, t_min=1e-3, t_max=10.0)
    return jax.grad(lambda v: ops.libra_pb(v, ede).sum() + ops.ede_sign(v, *ede).sum())(x)

  chex.clear_trace_counter()
  x = jnp.ones((3, 3, 2, 2)) + jnp.arange(36.0).reshape(3, 3, 2, 2) / 10
  grads = [step(x, jnp.float32(p)) for p in (0.0, 0.3, 0.6, 0.99)]
  assert not np.allclose(grads[0], grads[-1])  # t, k really changed the backward pass


def test_ops_is_pure_jnp():
  # The backend choice lives in irnet_jax.kernels: ops reads no platform or environment.
  source = (pathlib.Path(ops.__file__)).read_text()
  assert not re.search(r"^(from|import) irnet_jax|os\.environ|default_backend", source,
                       re.M)
