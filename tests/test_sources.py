"""Tests for irnet_jax.data: sources, augmentation, grain pipelines.

All data is tiny and made here (tmp_path npz files, scikit-learn digits, tfds
mock data); nothing is downloaded and TensorFlow is never imported.
"""
import sys

import ml_collections
import numpy as np
import pytest

from irnet_jax import data
from irnet_jax.data import augment as aug
from irnet_jax.data import sources

MEAN = (0.25, 0.5, 0.75)
STD = (0.5, 0.25, 0.125)


def _cfg(**kwargs) -> ml_collections.ConfigDict:
  base = dict(name="digits", data_dir=None, path="", augment="none",
              image_size=16, mean=MEAN, std=STD, num_threads=2,
              test_split="test")
  base.update(kwargs)
  return ml_collections.ConfigDict(base)


def _write_npz(path, n_train=40, n_test=13, side=8, grey=None,
               num_classes=5, **overrides):
  """Image ``i`` of each split is filled with the value ``i`` (channel c with
  ``i + c``) so an example can be identified from its pixels; labels i % C."""
  def make(n):
    x = np.arange(n, dtype=np.uint8)[:, None, None, None] + np.zeros(
        (1, side, side, 3), np.uint8)
    x = x + np.arange(3, dtype=np.uint8)
    if grey == "2d":
      x = x[..., 0]
    elif grey == "1ch":
      x = x[..., :1]
    return x, (np.arange(n) % num_classes).astype(np.int64)
  x_train, y_train = make(n_train)
  x_test, y_test = make(n_test)
  arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return str(path)


def _ids(images: np.ndarray) -> np.ndarray:
  """Recovers the example index from a uint8 batch."""
  assert images.dtype == np.uint8
  return images[:, 0, 0, 0].astype(int)


@pytest.fixture(name="npz_path")
def fixture_npz_path(tmp_path):
  return _write_npz(tmp_path / "tiny.npz")


# ----------------------------------------------------------------------------
# sources


def test_digits_source():
  info = data.dataset_info(_cfg())
  assert info == data.DatasetInfo(1437, 360, 10, (16, 16, 3))
  x_train, y_train, x_test, y_test = data.load_digits_arrays()
  assert x_train.shape == (1437, 16, 16, 3) and x_test.shape == (360, 16, 16, 3)
  assert x_train.dtype == np.uint8 and y_train.dtype == np.int32
  assert x_train.max() == 255 and x_train.min() == 0
  assert set(np.unique(y_train)) == set(range(10)) == set(np.unique(y_test))
  # 2x2 pixel repetition and grey replicated to RGB.
  np.testing.assert_array_equal(x_train[:, ::2, ::2].repeat(2, 1).repeat(2, 2),
                                x_train)
  np.testing.assert_array_equal(x_train[..., 0], x_train[..., 2])
  # Deterministic split, independent of the cache.
  data.load_digits_arrays.cache_clear()
  again = data.load_digits_arrays()
  for a, b in zip(again, (x_train, y_train, x_test, y_test)):
    np.testing.assert_array_equal(a, b)
  # Disjoint up to the few duplicate images of the dataset itself.
  train_bytes = {x.tobytes() for x in x_train}
  assert sum(x.tobytes() in train_bytes for x in x_test) < 5
  train, test = data.get_sources(_cfg())
  ex = test[0]
  assert ex["image"].shape == (16, 16, 3) and isinstance(ex["label"], int)
  assert len(train) == 1437 and len(test) == 360


@pytest.mark.parametrize("grey", [None, "2d", "1ch"])
def test_npz_source(tmp_path, grey):
  path = _write_npz(tmp_path / "g.npz", grey=grey)
  cfg = _cfg(name="npz", path=path, image_size=8)
  assert data.dataset_info(cfg) == data.DatasetInfo(40, 13, 5, (8, 8, 3))
  train, test = data.get_sources(cfg)
  assert len(train) == 40 and len(test) == 13
  ex = train[7]
  assert ex["image"].shape == (8, 8, 3) and ex["image"].dtype == np.uint8
  assert ex["label"] == 2 and isinstance(ex["label"], int)
  if grey:
    np.testing.assert_array_equal(ex["image"], np.full((8, 8, 3), 7))


@pytest.mark.parametrize("kind, expect", [
    ("empty_path", "needs ds_cfg.path"),
    ("missing_file", "does not exist"),
    ("not_npz", "not a readable .npz"),
    ("missing_key", "lacks the arrays ['y_test']"),
    ("float_x", "expected uint8"),
    ("bad_shape", "expected (N,H,W,3)"),
    ("float_y", "expected integer"),
    ("length_mismatch", "same non-zero length"),
])
def test_npz_errors(tmp_path, kind, expect):
  path = str(tmp_path / "bad.npz")
  if kind == "empty_path":
    path = ""
  elif kind == "not_npz":
    with open(path, "w") as f:
      f.write("hello")
  elif kind != "missing_file":
    overrides = {
        "missing_key": dict(y_test=None),
        "float_x": dict(x_train=np.zeros((40, 8, 8, 3), np.float32)),
        "bad_shape": dict(x_test=np.zeros((13, 8, 8, 2), np.uint8)),
        "float_y": dict(y_train=np.zeros(40, np.float32)),
        "length_mismatch": dict(y_train=np.zeros(39, np.int64)),
    }[kind]
    _write_npz(path, **overrides)
  with pytest.raises(ValueError, match="np.savez") as e:
    data.dataset_info(_cfg(name="npz", path=path, image_size=8))
  assert expect in str(e.value)


def test_unknown_name_and_augment():
  with pytest.raises(ValueError) as e:
    data.dataset_info(_cfg(name="mnist"))
  for name in data.DATASETS:
    assert repr(name) in str(e.value)
  with pytest.raises(ValueError, match="Unknown ds_cfg.augment='autoaugment'"):
    data.dataset_info(_cfg(augment="autoaugment"))


def test_image_size_mismatch(npz_path):
  with pytest.raises(ValueError, match="Set ds_cfg.image_size=8"):
    data.dataset_info(_cfg(name="npz", path=npz_path, image_size=32,
                           augment="cifar"))


def test_tfds_not_prepared(tmp_path):
  cfg = _cfg(name="tfds:cifar10", data_dir=str(tmp_path), image_size=32)
  with pytest.raises(ValueError) as e:
    data.dataset_info(cfg)
  msg = str(e.value)
  assert "cifar10 is not prepared in " + str(tmp_path) in msg
  assert f"tfds build cifar10 --data_dir={tmp_path}" in msg
  assert "tensorflow" not in sys.modules


def test_tfds_mock_cifar10(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _cfg(name="tfds:cifar10", data_dir=str(tmp_path), image_size=32,
             augment="cifar")
  with tfds.testing.mock_data(num_examples=10):
    info = data.dataset_info(cfg)
    assert info == data.DatasetInfo(10, 10, 10, (32, 32, 3))
    ds = data.train_dataset(cfg, 4, seed=0, num_steps=3)
    batch = ds[2]
    assert batch["image"].shape == (4, 32, 32, 3)
    assert batch["label"].dtype == np.int32
    masks = [b["mask"] for b in data.eval_batches(cfg, 4)]
    assert sum(m.sum() for m in masks) == 10 and len(masks) == 3
  assert "tensorflow" not in sys.modules


def test_tfds_mock_imagenet_variable_size(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  cfg = _cfg(name="imagenet2012", data_dir=str(tmp_path), image_size=24,
             augment="imagenet", test_split="validation")
  with tfds.testing.mock_data(num_examples=5):
    info = data.dataset_info(cfg)
    assert info.num_classes == 1000 and info.image_shape == (24, 24, 3)
    assert data.train_dataset(cfg, 2, 0, 2)[1]["image"].shape == (2, 24, 24, 3)
    batches = list(data.eval_batches(cfg, 2))
    assert batches[-1]["image"].shape == (2, 24, 24, 3)
    with pytest.raises(ValueError, match="vary in size"):
      data.dataset_info(_cfg(name="imagenet2012", data_dir=str(tmp_path),
                             image_size=24, augment="cifar"))


def test_tfds_plain_sequence_source(monkeypatch):
  """A tfds.data_source that is a plain list (no dataset_info) also works."""
  rng = np.random.default_rng(0)
  splits = {split: [{"image": rng.integers(0, 256, (32, 32, 3), np.uint8),
                     "label": np.int64(i % 3), "id": str(i)} for i in range(n)]
            for split, n in (("train", 6), ("test", 5))}
  monkeypatch.setattr(sources, "_tfds_split",
                      lambda name, split, data_dir: splits[split])
  cfg = _cfg(name="tfds:cifar100", image_size=32, augment="cifar")
  assert data.dataset_info(cfg) == data.DatasetInfo(6, 5, 3, (32, 32, 3))
  batch = data.train_dataset(cfg, 4, 0, 2)[1]
  assert batch.keys() == {"image", "label"}
  assert sum(b["mask"].sum() for b in data.eval_batches(cfg, 4)) == 5


# ----------------------------------------------------------------------------
# training pipeline


def _equal(a, b):
  return all(np.array_equal(a[k], b[k]) for k in a) and a.keys() == b.keys()


def test_train_determinism_and_sharding(tmp_path):
  path = _write_npz(tmp_path / "c.npz", side=32, n_train=40)
  cfg = _cfg(name="npz", path=path, image_size=32, augment="cifar")
  one = data.train_dataset(cfg, 8, seed=3, num_steps=12)
  assert len(one) == 12
  again = data.train_dataset(cfg, 8, seed=3, num_steps=20)  # Prefix property.
  for step in (0, 5, 11):
    assert _equal(one[step], again[step])
  for count in (2, 4):
    shards = [data.train_dataset(cfg, 8, 3, 12, index, count)
              for index in range(count)]
    assert all(len(s) == 12 for s in shards)
    for step in (0, 4, 7, 11):  # 5 steps per epoch: epochs 0, 0, 1, 2.
      locals_ = [s[step] for s in shards]
      assert locals_[0]["image"].shape == (8 // count, 32, 32, 3)
      joined = {k: np.concatenate([b[k] for b in locals_]) for k in locals_[0]}
      assert _equal(joined, one[step])
  assert not np.array_equal(one[0]["image"], one[1]["image"])
  other_seed = data.train_dataset(cfg, 8, seed=4, num_steps=12)
  assert not np.array_equal(one[0]["image"], other_seed[0]["image"])
  with pytest.raises(ValueError, match="not divisible by process_count=3"):
    data.train_dataset(cfg, 8, 0, 1, 0, 3)


def test_train_epochs_reshuffle_and_resume(npz_path):
  cfg = _cfg(name="npz", path=npz_path, image_size=8)
  # 12 does not divide 40: batches straddle epochs.
  ds = data.train_dataset(cfg, 12, seed=0, num_steps=10)
  stream = np.concatenate([_ids(ds[s]["image"]) for s in range(10)])
  epochs = stream[:120].reshape(3, 40)
  for epoch in epochs:
    assert sorted(epoch) == list(range(40))
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[0], np.arange(40))
  labels = np.concatenate([ds[s]["label"] for s in range(10)])
  np.testing.assert_array_equal(labels, stream % 5)
  resumed = list(data.train_iterator(ds, 7, num_threads=2))
  assert len(resumed) == 3
  for got, step in zip(resumed, range(7, 10)):
    assert _equal(got, ds[step])
  assert len(list(data.train_iterator(ds, 0, num_threads=0))) == 10


def test_train_uint8_batches_and_augmentation(tmp_path):
  path = _write_npz(tmp_path / "c.npz", side=32, n_train=40)
  plain_cfg = _cfg(name="npz", path=path, image_size=32, augment="none")
  plain = data.train_dataset(plain_cfg, 8, seed=1, num_steps=2)[1]
  # uint8 up to the device: no float32 on the host.
  assert plain["image"].dtype == np.uint8 and plain["label"].dtype == np.int32
  ids = _ids(plain["image"])
  raw = ids[:, None, None, None] + np.arange(3)  # Stored pixel values.
  np.testing.assert_array_equal(plain["image"],
                                np.broadcast_to(raw, plain["image"].shape))
  aug_cfg = _cfg(name="npz", path=path, image_size=32, augment="cifar")
  auged = data.train_dataset(aug_cfg, 8, seed=1, num_steps=2)[1]
  # Same shuffle, different pixels (zero padding enters the crops).
  np.testing.assert_array_equal(auged["label"], plain["label"])
  assert auged["image"].shape == plain["image"].shape
  assert auged["image"].dtype == np.uint8
  assert not np.array_equal(auged["image"], plain["image"])
  assert np.any(np.all(auged["image"] == 0, axis=-1))


# ----------------------------------------------------------------------------
# evaluation


@pytest.mark.parametrize("batch, count", [(4, 1), (13, 1), (6, 2), (4, 4)])
def test_eval_batches_cover_test_set(npz_path, batch, count):
  cfg = _cfg(name="npz", path=npz_path, image_size=8)
  per_process = [list(data.eval_batches(cfg, batch, index, count))
                 for index in range(count)]
  steps = -(-13 // batch)
  assert all(len(p) == steps for p in per_process)
  seen = []
  for step in range(steps):
    for p in per_process:
      b = p[step]
      assert b["image"].shape == (batch // count, 8, 8, 3)
      assert b["mask"].dtype == bool and b["label"].dtype == np.int32
      assert np.all(b["image"][~b["mask"]] == 0)
      assert np.all(b["label"][~b["mask"]] == 0)
      seen.extend(_ids(b["image"][b["mask"]]))
  assert seen == list(range(13))  # Every image once, in order.


# ----------------------------------------------------------------------------
# augmentation functions


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
  out = data.normalize(x, MEAN, STD)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0], [(0 - 0.25) / 0.5, (1 - 0.5) / 0.25,
                                         (0.2 - 0.75) / 0.125], rtol=1e-6)


# ----------------------------------------------------------------------------
# issue 19: npz labels checked on first read, the file read once per process


def test_npz_read_once_while_unchanged(tmp_path, monkeypatch):
  path = _write_npz(tmp_path / "once.npz")
  loads = []
  real_load = np.load

  def counting_load(*args, **kwargs):
    loads.append(args[0])
    return real_load(*args, **kwargs)
  monkeypatch.setattr(np, "load", counting_load)
  cfg = _cfg(name="npz", path=path, image_size=8)
  data.dataset_info(cfg)
  first, _ = data.get_sources(cfg)
  read = len(loads)
  assert read >= 1
  for _ in range(3):  # An evaluation per epoch: nothing read again.
    data.dataset_info(cfg)
    again, _ = data.get_sources(cfg)
  assert len(loads) == read
  assert again.images is first.images and not again.images.flags.writeable
  # A rewritten file (new size and mtime) is read again.
  _write_npz(path, n_train=41)
  assert data.dataset_info(cfg).num_train == 41
  assert len(data.get_sources(cfg)[0]) == 41 and len(loads) > read


@pytest.mark.parametrize("array, labels, bad", [
    ("y_train", np.r_[np.arange(39) % 5, -3], "-3"),
    ("y_test", np.r_[np.arange(12) % 5, -1], "-1"),
    ("y_test", np.r_[np.arange(12) % 5, 7], "7"),  # y_train stops at 4.
])
def test_npz_labels_outside_the_classes(tmp_path, array, labels, bad):
  path = _write_npz(tmp_path / "labels.npz", **{array: labels})
  with pytest.raises(ValueError, match=f"{array} in .*labels.npz'? has the "
                     f"(negative )?label {bad}.*Number the classes 0..C-1"):
    data.dataset_info(_cfg(name="npz", path=path, image_size=8))
  with pytest.raises(ValueError, match=f"{array} in "):
    data.get_sources(_cfg(name="npz", path=path, image_size=8))
