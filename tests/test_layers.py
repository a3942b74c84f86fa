"""irnet_jax.layers: BatchNorm's running statistics as torch keeps them, the binary
convolution's padding, max pooling and its gradient (the binary layers' methods are in
test_methods.py, the whole networks in test_models.py)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from irnet_jax import layers


def test_bn_updates_running_stats_unbiased_like_torch():
  bn = layers.BatchNorm(3)
  x = jax.random.normal(jax.random.key(1), (4, 5, 5, 3)) * 2 + 1
  y = bn(x)
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  n = 4 * 5 * 5
  np.testing.assert_allclose(bn.mean[...], 0.1 * x.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * x.var(axis=(0, 1, 2)) * n / (n - 1),
                             rtol=1e-5)


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
