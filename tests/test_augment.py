"""irnet_jax.data.augment: the host augmentations (pure, deterministic in their draws),
ImageNet augmentation against torchvision.

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


# ------------------------------------------------------------------ pure, deterministic


def test_pad_random_crop_matches_numpy_pad():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (32, 32, 3), np.uint8)
  before = image.copy()
  for seed in range(20):
    out = aug.pad_random_crop(image, np.random.default_rng(seed), 32, 4)
    replay = np.random.default_rng(seed)
    top, left = replay.integers(0, 9), replay.integers(0, 9)
    expected = np.pad(image, ((4, 4), (4, 4), (0, 0)))[top:top + 32,
                                                       left:left + 32]
    np.testing.assert_array_equal(out, expected)
  np.testing.assert_array_equal(image, before)  # Pure.


def test_cifar_augment_zero_border_only_from_padding():
  white = np.full((32, 32, 3), 255, np.uint8)
  saw_border = False
  for seed in range(30):
    out = aug.cifar_augment(white, np.random.default_rng(seed))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    zero_rows = np.where(np.all(out == 0, axis=(1, 2)))[0]
    zero_cols = np.where(np.all(out == 0, axis=(0, 2)))[0]
    # Everything else is exactly the image; the zeros are whole edge rows/cols.
    keep = np.ones((32, 32), bool)
    keep[zero_rows] = False
    keep[:, zero_cols] = False
    assert np.all(out[keep] == 255) and np.all(out[~keep] == 0)
    assert len(zero_rows) <= 4 and len(zero_cols) <= 4
    for idx in (zero_rows, zero_cols):
      assert all(i < 4 for i in idx) or all(i >= 28 for i in idx)
    saw_border |= len(zero_rows) + len(zero_cols) > 0
  assert saw_border


def test_random_functions_deterministic_and_pure():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (45, 30, 3), np.uint8)
  before = image.copy()
  fns = [lambda x, r: aug.cifar_augment(x, r, size=30, pad=4),
         lambda x, r: aug.shift_augment(x, r, size=30),
         lambda x, r: aug.random_resized_crop(x, r, 16),
         lambda x, r: aug.color_jitter(x, r),
         lambda x, r: aug.imagenet_augment(x, r, 16),
         aug.train_transform("imagenet", 20)]
  for fn in fns:
    a = fn(image, np.random.default_rng(5))
    b = fn(image, np.random.default_rng(5))
    c = fn(image, np.random.default_rng(6))
    assert a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
  np.testing.assert_array_equal(image, before)
  assert aug.imagenet_augment(image, rng, 16).shape == (16, 16, 3)


def test_random_flip():
  image = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  outs = {aug.random_flip(image, np.random.default_rng(s)).tobytes()
          for s in range(10)}
  assert outs == {image.tobytes(), image[:, ::-1].tobytes()}


def test_random_resized_crop_box_bounds():
  rng = np.random.default_rng(0)
  for _ in range(200):
    top, left, h, w = aug.random_resized_crop_box(50, 80, rng)
    assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 80
    assert 0.08 * 4000 * 0.9 <= h * w <= 4000
  # Impossible aspect ratio: falls back to the clamped centre crop.
  assert aug.random_resized_crop_box(10, 100, rng, ratio=(1.0, 1.0),
                                     scale=(0.99, 1.0)) == (0, 45, 10, 10)


def test_resize_center_crop():
  image = np.random.default_rng(0).integers(0, 256, (256, 300, 3), np.uint8)
  # Shorter side already 256 = 224 / 0.875: a pure centre crop.
  np.testing.assert_array_equal(aug.resize_center_crop(image, 224),
                                image[16:240, 38:262])
  tall = np.zeros((500, 375, 3), np.uint8)
  assert aug.resize_center_crop(tall, 224).shape == (224, 224, 3)
  assert aug.eval_transform("imagenet", 8)(tall).shape == (8, 8, 3)
  assert aug.eval_transform("cifar", 8)(tall) is tall


def test_normalize():
  x = np.array([[[0, 255, 51]]], np.uint8)
  out = aug.normalize(x, (0.25, 0.5, 0.75), (0.5, 0.25, 0.125))
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], [(0 - 0.25) / 0.5, (1 - 0.5) / 0.25,
                                         (0.2 - 0.75) / 0.125], rtol=1e-6)
