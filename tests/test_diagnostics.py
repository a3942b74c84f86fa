"""Information-retention diagnostics (irnet_jax.diagnostics)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irnet_jax import diagnostics, layers, models, ops

# The small checks run inside one jit each: eager dispatch would compile every
# primitive separately, which dominates the run time on a shared CPU.


def test_entropy_balanced_and_constant():
  @jax.jit
  def values():
    return (diagnostics.entropy_bits(jnp.array([1.0, -1.0] * 50)),
            diagnostics.entropy_bits(jnp.ones(64)), diagnostics.entropy_bits(-jnp.ones(64)),
            diagnostics.entropy_bits(jnp.array([1.0, 0.0, 0.0, 0.0])),
            diagnostics.entropy_bits(jnp.array([[1.0, 1.0], [-1.0, 1.0]]), axis=0))

  balanced, ones, minus_ones, with_zeros, per_col = values()
  assert float(balanced) == pytest.approx(1.0, abs=1e-6)
  assert float(ones) == 0.0 and float(minus_ones) == 0.0
  # Zeros count as "not +1": [1, 0, 0, 0] has p = 1/4.
  expected = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
  assert float(with_zeros) == pytest.approx(expected, abs=1e-6)
  np.testing.assert_allclose(per_col, [1.0, 0.0], atol=1e-6)  # Per-axis entropy.


def test_libra_pb_has_higher_entropy_than_sign_on_skewed_kernel():
  @jax.jit
  def values(key):
    kernel = diagnostics.skewed_gaussian_kernel(key, (3, 3, 16, 8), mean=0.5)
    return (diagnostics.weight_entropy_by_quantizer(kernel),
            diagnostics.sign_balance(ops.libra_pb(kernel)))

  h, balance = values(jax.random.key(0))
  assert float(h["libra_pb"]) > float(h["sign"]) + 0.05
  assert float(h["libra_pb"]) > 0.99
  assert balance.shape == (8,)
  np.testing.assert_allclose(balance, 0.5, atol=0.1)


def test_flip_ratio_and_quantization_error():
  @jax.jit
  def values(key):
    w = jax.random.normal(key, (3, 3, 4, 4))
    s = jnp.sign(w).astype(jnp.int8)
    return (diagnostics.flip_ratio(s, s), diagnostics.flip_ratio(s, -s),
            diagnostics.quantization_error(w, "libra_pb"),
            diagnostics.quantization_error(jnp.sign(w), "sign"),
            diagnostics.quantization_error(w, "none"),
            diagnostics.ede_grad_scale(jnp.zeros(3), ops.EDE(0.5, 2.0)))

  same, negated, err_libra, err_sign, err_none, grad0 = map(float, values(jax.random.key(1)))
  assert same == 0.0 and negated == 1.0
  assert 0.0 < err_libra < 1.0
  assert err_sign == 0.0 and err_none == 0.0
  assert grad0 == 1.0  # EDE gradient scale at x = 0 is k * t.


@pytest.fixture(scope="module")
def resnet20():
  # Shared: building a model eagerly is the slowest step of this file. Tests
  # must not modify it.
  return models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))


def test_binary_layers_and_weight_signs(resnet20):
  names = list(diagnostics.binary_layers(resnet20))
  assert len(names) == 18 and "layer1.0.conv1" in names and "conv1" not in names
  signs = nnx.jit(diagnostics.weight_signs)(resnet20)
  assert signs["layer1.0.conv1"].dtype == jnp.int8
  assert signs["layer1.0.conv1"].shape == (3, 3, 16, 16)


def test_diagnostics_jit_compiles_once_and_is_finite(resnet20):
  model = resnet20
  prev = diagnostics.weight_signs(model)
  x = jax.random.normal(jax.random.key(2), (2, 32, 32, 3))
  traces = []

  def fn(m, ede, prev_signs, acts):
    traces.append(1)
    return diagnostics.measure(m, ede, prev_signs, acts)

  jitted = nnx.jit(fn)
  bn_mean = np.asarray(model.bn1.mean[...])
  out = jitted(model, ops.ede_schedule(0.1), prev, x)
  out2 = jitted(model, ops.ede_schedule(0.9), prev, x)
  assert len(traces) == 1
  for key in ("weight_entropy/layer1.0.conv1", "weight_entropy_mean", "quant_error_mean",
              "flip_ratio/layer3.2.conv2", "flip_ratio_mean", "ede_grad_scale_w",
              "act_entropy/layer1.0.conv1", "act_entropy_mean", "ede_grad_scale_a"):
    assert key in out, key
  assert all(np.isfinite(float(v)) for v in out.values())
  assert float(out["flip_ratio_mean"]) == 0.0
  assert 0.9 < float(out["weight_entropy_mean"]) <= 1.0
  # Larger t late in training: smaller EDE gradient scale away from 0.
  assert float(out2["ede_grad_scale_w"]) < float(out["ede_grad_scale_w"])
  # The forward pass for activations must not touch the model's BN statistics.
  np.testing.assert_array_equal(model.bn1.mean[...], bn_mean)
  # The layers sow only inside nnx.capture: the model holds no activations.
  assert not jax.tree.leaves(nnx.state(model, nnx.Intermediate))
  assert set(diagnostics.to_floats(out)) == set(out)


def test_binary_conv_inputs_are_the_binary_layers_inputs(resnet20):
  x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
  inputs = diagnostics.binary_conv_inputs(resnet20, x)
  binary_acts = {n for n, m in diagnostics.binary_layers(resnet20).items() if m.binary_acts}
  assert set(inputs) == binary_acts and len(inputs) == 18
  assert inputs["layer1.0.conv1"].shape == (2, 32, 32, 16)
  assert inputs["layer3.2.conv2"].shape == (2, 8, 8, 64)
  # The second conv of a block sees the first's output after its BN (and activation).
  assert not np.allclose(inputs["layer1.0.conv1"], inputs["layer1.0.conv2"])
  # A forward pass outside nnx.capture stores nothing, also under a jitted train step.
  model = nnx.clone(resnet20)
  nnx.jit(lambda m, x: m(x))(model, x)
  assert not jax.tree.leaves(nnx.state(model, layers.BinaryInput))
  assert not any(hasattr(m, "binary_input") for _, m in nnx.iter_graph(model))


def test_measure_state_under_jax_jit(resnet20):
  graphdef, state = nnx.split(resnet20)
  fn = jax.jit(diagnostics.measure_state, static_argnums=0)
  out = fn(graphdef, state, ops.EDE(1.0, 1.0))
  assert "flip_ratio_mean" not in out and "act_entropy_mean" not in out
  assert all(np.isfinite(float(v)) for v in out.values())
  # 32w1a: no binary weights, so no (misleadingly zero) weight keys at all.
  fp_weights = nnx.eval_shape(lambda: models.create("resnet20", weight_bits=32))
  assert diagnostics.measure(fp_weights) == {}
