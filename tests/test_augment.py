"""ImageNet augmentation against torchvision, and the on-device colour jitter.

The reference values in testdata/torchvision_augment.npz come from torchvision
itself (it is not a dependency); regenerate them with

  /work/venv-tv/bin/python tests/testdata/make_torchvision_augment.py

(any Python with torch + torchvision). torchvision draws from torch's RNG and
we draw from numpy's, so the crop test replays the draws torchvision made
through our box function: the same draws must give the same box.
"""
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from irnet_jax.data import augment as aug
from irnet_jax.data import device

GOLDEN = np.load(os.path.join(os.path.dirname(__file__), "testdata",
                              "torchvision_augment.npz"))


class Replay:
  """Plays back recorded (kind, lo, hi, value) draws, checking each request."""

  def __init__(self, draws):
    self.draws = list(draws)

  def _next(self, kind, lo, hi):
    k, rlo, rhi, value = self.draws.pop(0)
    assert k == kind and rlo == pytest.approx(lo, abs=1e-6)
    assert rhi == pytest.approx(hi, abs=1e-6)
    return value

  def uniform(self, lo, hi):
    return self._next(0, lo, hi)

  def integers(self, lo, hi):
    return int(self._next(1, lo, hi))


def test_random_resized_crop_box_replays_torchvision():
  cases, boxes = GOLDEN["rrc_cases"], GOLDEN["rrc_boxes"]
  offsets, draws = GOLDEN["rrc_offsets"], GOLDEN["rrc_draws"]
  fallbacks = 0
  for k, (h, w, s0, s1, r0, r1) in enumerate(cases):
    replay = Replay(draws[offsets[k]:offsets[k + 1]])
    box = aug.random_resized_crop_box(int(h), int(w), replay, (s0, s1),
                                      (r0, r1))
    assert box == tuple(boxes[k]), k
    assert not replay.draws, k  # Consumed exactly torchvision's draws.
    fallbacks += offsets[k + 1] - offsets[k] == 20  # 10 failed tries.
  assert fallbacks >= 15  # The three fallback branches were exercised.


def test_resized_crop_matches_torchvision():
  for box, expected in zip(GOLDEN["crop_boxes"], GOLDEN["crop_out"]):
    out = aug.resized_crop(GOLDEN["crop_image"], tuple(map(int, box)), 16)
    np.testing.assert_array_equal(out, expected)


def test_eval_resize_center_crop_matches_torchvision():
  # Resize(32) + CenterCrop(28): 224 / 256 scaled down (28 / 0.875 = 32).
  for i, expected in enumerate(GOLDEN["eval_out"]):
    out = aug.resize_center_crop(GOLDEN[f"eval_image{i}"], 28)
    np.testing.assert_array_equal(out, expected)


def test_color_jitter_ops_match_torchvision():
  x = GOLDEN["jitter_image"].astype(np.float32) / 255
  for order, factors, expected in zip(GOLDEN["jitter_orders"],
                                      GOLDEN["jitter_factors"],
                                      GOLDEN["jitter_out"]):
    host = aug.apply_color_jitter(x, order, factors.astype(np.float32))
    np.testing.assert_allclose(host, expected, atol=2e-6)
    dev = jax.jit(device.apply_color_jitter)(x, order, factors)
    np.testing.assert_allclose(dev, expected, atol=2e-6)
  # Order matters: the reference changes when the order is reversed.
  order, factors = GOLDEN["jitter_orders"][0], GOLDEN["jitter_factors"][0]
  rev = aug.apply_color_jitter(x, order[::-1], factors.astype(np.float32))
  assert np.abs(rev - GOLDEN["jitter_out"][0]).max() > 1e-3


def test_color_jitter_params_distribution():
  rng = np.random.default_rng(0)
  orders, factors = zip(*(aug.color_jitter_params(rng) for _ in range(2000)))
  factors = np.array(factors)
  assert {tuple(o) for o in orders} == set(itertools.permutations(range(4)))
  lo, hi = [0.8, 0.8, 0.8, -0.1], [1.2, 1.2, 1.2, 0.1]
  assert np.all(factors >= lo) and np.all(factors <= hi)
  np.testing.assert_allclose(factors.mean(0), [1, 1, 1, 0], atol=0.01)
  keys = jax.random.split(jax.random.key(0), 2000)
  d_order, d_factors = jax.vmap(device.color_jitter_params)(keys)
  d_factors = np.asarray(d_factors)
  assert len({tuple(o) for o in np.asarray(d_order)}) == 24
  assert np.all(d_factors >= lo) and np.all(d_factors <= hi)
  np.testing.assert_allclose(d_factors.mean(0), [1, 1, 1, 0], atol=0.01)
  np.testing.assert_allclose(d_factors.std(0), factors.std(0), rtol=0.1)


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


def test_model_input_normalizes_uint8_and_passes_floats():
  mean, std = (0.25, 0.5, 0.75), (0.5, 0.25, 0.125)
  x = np.array([[[[0, 255, 51]]]], np.uint8)
  out = device.model_input(jnp.asarray(x), mean, std)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, aug.normalize(x, mean, std), rtol=1e-6)
  floats = np.ones((1, 2, 2, 3), np.float64)
  assert device.model_input(floats, mean, std) is floats


def test_host_color_jitter_uint8():
  image = np.random.default_rng(0).integers(0, 256, (8, 8, 3), np.uint8)
  out = aug.color_jitter(image, np.random.default_rng(0), (0, 0, 0, 0))
  np.testing.assert_array_equal(out, image)  # Zero strengths: identity.
  grey = np.full((4, 4, 3), 100, np.uint8)  # Only brightness changes grey.
  out = aug.color_jitter(grey, np.random.default_rng(3), (0, 0.4, 0.4, 0.5))
  np.testing.assert_array_equal(out, grey)
  rng = np.random.default_rng(4)
  replay = np.random.default_rng(4)
  order, factors = aug.color_jitter_params(replay)
  expected = aug.apply_color_jitter(image / np.float32(255), order,
                                    factors.astype(np.float32))
  np.testing.assert_array_equal(aug.color_jitter(image, rng),
                                np.rint(expected * 255).astype(np.uint8))
