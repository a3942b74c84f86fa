"""irnet_jax.data.sources: the table of data sets (sources.SOURCES) and the sources read
into memory or through tfds: digits, npz (checked on first read, read once), tfds.

All data is tiny and made here (tmp_path npz files, scikit-learn digits, tfds mock
data); nothing is downloaded and TensorFlow is never imported.
"""
import sys

import ml_collections
import numpy as np
import pytest

from irnet_jax import data
from irnet_jax.data import sources

MEAN = (0.25, 0.5, 0.75)
STD = (0.5, 0.25, 0.125)


def _cfg(**kwargs) -> ml_collections.ConfigDict:
  base = dict(name="digits", data_dir=None, path="", augment="none",
              image_size=16, mean=MEAN, std=STD, num_threads=2,
              test_split="test")
  base.update(kwargs)
  return ml_collections.ConfigDict(base)


def test_source_table_drives_every_dispatcher(tmp_path, monkeypatch, image_tree):
  """One row of sources.SOURCES per name: opening, inspection, the default eval split,
  whether the data is in memory, and the class count the summary reads."""
  from irnet_jax import summary  # pylint: disable=import-outside-toplevel
  assert data.DATASETS == tuple(sources.SOURCES)
  assert sources.source_spec("imagenet2012") is sources.SOURCES["tfds:imagenet2012"]
  assert sources.source_spec("tfds:mnist").num_classes is None
  assert sources.tfds_name("imagenet2012") == "imagenet2012"
  assert sources.tfds_name("tfds:") is None and sources.tfds_name("npz") is None
  with pytest.raises(ValueError, match="Unknown dataset --config.dataset.name='tfds:'"):
    sources.source_spec("tfds:")
  assert {n for n, s in sources.SOURCES.items() if s.in_memory} == {
      "cifar10", "cifar100", "npz", "digits"}
  for name, split in (("imagefolder", "val"), ("imagenet2012", "validation"),
                      ("filelist", "test"), ("tfds:mnist", "test")):
    assert sources.eval_split_name({"name": name, "test_split": ""}) == split
  assert sources.eval_split_name({"name": "imagefolder", "test_split": "v"}) == "v"
  for name, classes in (("cifar100", 100), ("digits", 10), ("imagenet2012", 1000),
                        ("npz", None), ("nope", None)):
    assert summary._dataset_classes(name) == classes, name
  # An in-memory row opens ArraySources; a file row refuses cache_on_device and lists
  # the in-memory names.
  train, _ = sources.get_sources({"name": "digits"})
  assert isinstance(train, sources.ArraySource)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root = tmp_path / "data"
  image_tree(root, "train")
  image_tree(root, "val")
  with pytest.raises(ValueError, match=r"in-memory data set \(cifar10, cifar100, npz, "
                     r"digits\); 'imagefolder' is read from files"):
    data.resident_arrays(_cfg(name="imagefolder", path=str(root), augment="imagenet",
                             test_split=""))
  arrays = data.resident_arrays(_cfg(name="digits", augment="none"))
  assert arrays["train_image"].shape[1:] == (16, 16, 3)


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
def test_npz_source(tmp_path, grey, write_indexed_npz):
  path = write_indexed_npz(tmp_path / "g.npz", grey=grey)
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
    ("empty_path", "needs --config.dataset.path"),
    ("missing_file", "does not exist"),
    ("not_npz", "not a readable .npz"),
    ("missing_key", "lacks the arrays ['y_test']"),
    ("float_x", "expected uint8"),
    ("bad_shape", "expected (N,H,W,3)"),
    ("float_y", "expected integer"),
    ("length_mismatch", "same non-zero length"),
])
def test_npz_errors(tmp_path, kind, expect, write_indexed_npz):
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
    write_indexed_npz(path, **overrides)
  with pytest.raises(ValueError, match="np.savez") as e:
    data.dataset_info(_cfg(name="npz", path=path, image_size=8))
  assert expect in str(e.value)


def test_unknown_name_and_augment():
  with pytest.raises(ValueError) as e:
    data.dataset_info(_cfg(name="mnist"))
  for name in data.DATASETS:
    assert repr(name) in str(e.value)
  with pytest.raises(ValueError, match="Unknown --config.dataset.augment='autoaugment'"):
    data.dataset_info(_cfg(augment="autoaugment"))


def test_image_size_mismatch(tmp_path, write_indexed_npz):
  npz_path = write_indexed_npz(tmp_path / "tiny.npz")
  with pytest.raises(ValueError, match="Set --config.dataset.image_size=8"):
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


def test_npz_read_once_while_unchanged(tmp_path, monkeypatch, write_indexed_npz):
  path = write_indexed_npz(tmp_path / "once.npz")
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
  write_indexed_npz(path, n_train=41)
  assert data.dataset_info(cfg).num_train == 41
  assert len(data.get_sources(cfg)[0]) == 41 and len(loads) > read


@pytest.mark.parametrize("array, labels, bad", [
    ("y_train", np.r_[np.arange(39) % 5, -3], "-3"),
    ("y_test", np.r_[np.arange(12) % 5, -1], "-1"),
    ("y_test", np.r_[np.arange(12) % 5, 7], "7"),  # y_train stops at 4.
])
def test_npz_labels_outside_the_classes(tmp_path, array, labels, bad, write_indexed_npz):
  path = write_indexed_npz(tmp_path / "labels.npz", **{array: labels})
  with pytest.raises(ValueError, match=f"{array} in .*labels.npz'? has the "
                     f"(negative )?label {bad}.*Number the classes 0..C-1"):
    data.dataset_info(_cfg(name="npz", path=path, image_size=8))
  with pytest.raises(ValueError, match=f"{array} in "):
    data.get_sources(_cfg(name="npz", path=path, image_size=8))
