"""Every model builds, runs forward/backward, and has the expected size and dtype."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irnet_jax import layers, models, ops

CASES = [
    ("resnet20", {}), ("resnet20", {"structure": "plain"}),
    ("resnet20", {"act_bits": 32}), ("resnet20", {"weight_bits": 32, "act_bits": 32}),
    ("resnet20", {"estimator": "ste", "weight_quantizer": "sign"}),
    ("resnet20", {"estimator": "approx_sign"}),
    ("resnet18_cifar", {}), ("vgg_small", {}), ("resnet18", {}), ("resnet34", {}),
    ("resnet18", {"act_bits": 32}), ("resnet20_1w32a", {}), ("resnet18_1w32a", {}),
]


def _param_count(model):
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name,kw", CASES)
def test_forward_backward_shapes(name, kw):
  model = models.create(name, num_classes=7, rngs=nnx.Rngs(0), **kw)
  size = 32 if name == "vgg_small" else 16  # VGG's FC needs 32x32; others take any size.
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  model.eval()
  assert model(x).shape == (2, 7)
  model.train()

  def loss_fn(m):
    return jnp.mean(m(x, ede=ops.EDE(0.3, 3.3)) ** 2)

  grads = nnx.grad(loss_fn)(model)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  # Binary convs must receive gradient (through the estimators) in every config.
  assert float(jnp.abs(grads["conv1"]["kernel"][...]).sum()) > 0


def test_resnet20_param_count_is_027m():
  n = _param_count(models.create("resnet20"))
  assert 0.26e6 < n < 0.28e6, n
  assert n == 269850  # the official ResNet-20 (with BatchNorm1d before the FC)


def test_bn_updates_running_stats_unbiased_like_torch():
  bn = layers.BatchNorm(3)
  x = jax.random.normal(jax.random.key(1), (4, 5, 5, 3)) * 2 + 1
  y = bn(x)
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  n = 4 * 5 * 5
  np.testing.assert_allclose(bn.mean[...], 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * x.var(axis=(0, 1, 2)) * n / (n - 1),
                             rtol=1e-5)


def test_float64_end_to_end(x64):
  model = models.create("resnet20", param_dtype=jnp.float64)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)))
  model.train()
  grads = nnx.grad(lambda m: m(x, ede=ops.EDE(0.5, 2.0)).sum())(model)
  assert model(x).dtype == jnp.float64
  assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))


def test_bfloat16_compute_keeps_float32_params_and_stats():
  model = models.create("resnet20", dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model.train()
  y = model(x, ede=ops.EDE(1.0, 1.0))
  assert y.dtype == jnp.bfloat16
  assert model.layer1[0].bn1.mean.dtype == jnp.float32
  assert model.layer1[0].conv1.kernel.dtype == jnp.float32


def test_binary_conv_zero_pads_after_sign():
  conv = layers.BinaryConv(1, 1, 3, padding=1, weight_quantizer="sign", rngs=nnx.Rngs(0))
  conv.kernel[...] = jnp.ones((3, 3, 1, 1))
  y = conv(jnp.full((1, 3, 3, 1), -0.5))
  # Corner sees 4 in-image taps of sign(-0.5) = -1 and 5 zero pads; centre sees 9 taps.
  assert float(y[0, 0, 0, 0]) == -4.0 and float(y[0, 1, 1, 0]) == -9.0


def test_max_pool_gradient_under_jit():
  """MaxPool2d(3, 2, padding=1) and its gradient (routed to each window's maximum)
  under jit, as the training step runs it; checked against a numpy loop."""
  x = np.asarray(jax.random.normal(jax.random.key(1), (2, 7, 6, 3)), np.float32)
  y, g = jax.jit(jax.value_and_grad(lambda x: (layers.max_pool(x, 3, 2, 1) * 1.5).sum()))(x)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  ref_y, ref_g = 0.0, np.zeros_like(padded)
  for n in range(2):
    for i in range(4):
      for j in range(3):
        for c in range(3):
          win = padded[n, 2 * i:2 * i + 3, 2 * j:2 * j + 3, c]
          a, b = np.unravel_index(np.argmax(win), win.shape)
          ref_y += 1.5 * win[a, b]
          ref_g[n, 2 * i + a, 2 * j + b, c] += 1.5
  np.testing.assert_allclose(float(y), ref_y, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(g), ref_g[:, 1:-1, 1:-1])


def test_unknown_model_name():
  with pytest.raises(ValueError, match="unknown model"):
    models.create("resnet50")
