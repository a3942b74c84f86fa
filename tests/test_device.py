"""irnet_jax.data.device: the device half of the input pipeline (uint8 -> model input,
the on-device colour jitter), against the host functions of irnet_jax.data.augment."""
import jax
import jax.numpy as jnp
import numpy as np

from irnet_jax.data import augment as aug
from irnet_jax.data import device

MEAN = (0.25, 0.5, 0.75)
STD = (0.5, 0.25, 0.125)


def test_model_input_is_the_host_normalization():
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), np.uint8)
  out = jax.jit(lambda x: device.model_input(x, MEAN, STD))(images)
  np.testing.assert_allclose(out, aug.normalize(images, MEAN, STD), rtol=1e-6,
                             atol=1e-6)


def test_model_input_normalizes_uint8_and_passes_floats():
  mean, std = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)
  x = np.array([[[[0, 255, 51]]]], np.uint8)
  out = device.model_input(jnp.asarray(x), mean, std)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, aug.normalize(x, mean, std), rtol=1e-6)
  floats = np.ones((1, 2, 2, 3), np.float64)
  assert device.model_input(floats, mean, std) is floats


def test_device_jitter_deterministic_per_step_and_example():
  images = jnp.asarray(np.random.default_rng(0).integers(
      0, 256, (4, 6, 6, 3), np.uint8))
  fn = jax.jit(lambda x, s: device.model_input(x, MEAN, STD,
                                               device.jitter_key(3, s)))
  a, b, c = fn(images, 10), fn(images, 10), fn(images, 11)
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  plain = device.model_input(images, MEAN, STD)
  assert not np.allclose(a[0], plain[0])
  assert fn._cache_size() == 1  # The step is traced: one compilation.
  # Example i of a batch draws from fold_in(key, i): independent of the
  # batch it sits in (so of the mesh and of the batch split).
  sub = jax.jit(lambda x: device.color_jitter(
      x, device.jitter_key(3, jnp.asarray(10))))(images[:2] / 255)
  full = device.color_jitter(images / 255, device.jitter_key(3, jnp.asarray(10)))
  np.testing.assert_allclose(sub, full[:2], atol=1e-6)


def test_device_color_jitter_matches_host_on_same_draws():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (3, 12, 10, 3), np.uint8)
  key = device.jitter_key(7, jnp.asarray(5))
  out = jax.jit(device.color_jitter)(images.astype(np.float32) / 255, key)
  for i, image in enumerate(images):
    order, factors = device.color_jitter_params(jax.random.fold_in(key, i))
    host = aug.apply_color_jitter(image.astype(np.float32) / 255,
                                  np.asarray(order), np.asarray(factors))
    np.testing.assert_allclose(out[i], host, atol=1e-5)
  # Examples and steps draw differently.
  assert not np.allclose(out[0], aug.apply_color_jitter(
      images[0].astype(np.float32) / 255, [0, 1, 2, 3], [1, 1, 1, 0]))
  other = jax.jit(device.color_jitter)(images.astype(np.float32) / 255,
                                       device.jitter_key(7, jnp.asarray(6)))
  assert not np.allclose(out, other)
