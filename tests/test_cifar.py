"""irnet_jax.data.cifar: the official CIFAR-10/100 python archives, downloaded once,
checked (md5) and read without running their pickles' code."""
import dataclasses
import io
import os
import pickle
import shutil
import sys
import tarfile
import urllib.error
import urllib.request

import numpy as np
import pytest

from irnet_jax import data
from irnet_jax.data import cifar


def _batch_pickle(images, labels, label_key):
  """A batch as the official archives store it (Python 2 era pickle)."""
  chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
  batch = {b"batch_label": b"testing", label_key: labels,
           b"data": np.ascontiguousarray(chw),
           b"filenames": [b"f%d.png" % i for i in range(len(images))]}
  return pickle.dumps(batch, protocol=2)


def _write_cifar_archive(path, name, per_batch=3, num_test=4):
  """A small archive in the official layout; returns its arrays and md5."""
  rng = np.random.default_rng(0)
  archive = cifar.ARCHIVES[name]
  members, arrays = {}, []
  for split_members, n in ((archive.train_members, per_batch),
                           (archive.test_members, num_test)):
    xs, ys = [], []
    for member in split_members:
      x = rng.integers(0, 256, (n, 32, 32, 3), np.uint8)
      y = [int(v) for v in rng.integers(0, archive.num_classes, n)]
      members[member] = _batch_pickle(x, y, archive.label_key)
      xs.append(x)
      ys += y
    arrays += [np.concatenate(xs), np.asarray(ys)]
  with tarfile.open(path, "w:gz") as tar:
    for member, payload in members.items():
      info = tarfile.TarInfo(member)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return arrays, cifar.md5sum(str(path))


@pytest.fixture(name="tiny_cifar")
def fixture_tiny_cifar(tmp_path, monkeypatch):
  """Both archives made here, served from a file:// URL; ARCHIVES point at them."""
  served = tmp_path / "server"
  served.mkdir()
  out = {}
  for name in ("cifar10", "cifar100"):
    filename = cifar.ARCHIVES[name].filename
    arrays, md5 = _write_cifar_archive(served / filename, name)
    monkeypatch.setitem(cifar.ARCHIVES, name, dataclasses.replace(
        cifar.ARCHIVES[name], url=(served / filename).as_uri(), md5=md5))
    out[name] = arrays
  cifar._load.cache_clear()  # pylint: disable=protected-access
  yield out
  cifar._load.cache_clear()  # pylint: disable=protected-access


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_archive_download_and_read(tmp_path, tiny_cifar, name, dataset_cfg):
  data_dir = tmp_path / "data"
  x_train, y_train, x_test, y_test = cifar.load_cifar(name, str(data_dir))
  # Downloaded once into the data dir (no partial files left), then reused.
  assert sorted(os.listdir(data_dir)) == [cifar.ARCHIVES[name].filename]
  for got, want in zip((x_train, y_train, x_test, y_test), tiny_cifar[name]):
    np.testing.assert_array_equal(got, want)
  assert x_train.shape == (15 if name == "cifar10" else 3, 32, 32, 3)
  assert x_train.dtype == np.uint8 and y_train.dtype == np.int32
  cfg = dataset_cfg(name, "cifar", data_dir=str(data_dir), image_size=32)
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(len(x_train), 4, 10 if name == "cifar10" else 100,
                                  (32, 32, 3))
  batch = data.train_dataset(cfg, 2, seed=0, num_steps=2)[1]
  assert batch["image"].shape == (2, 32, 32, 3)
  evals = list(data.eval_batches(dict(cfg, augment="none"), 4))
  assert evals[0]["label"].tolist() == y_test.tolist()
  assert "tensorflow" not in sys.modules


def test_cifar_default_data_dir(tmp_path, tiny_cifar, monkeypatch):
  monkeypatch.setenv("IRNET_JAX_DATA_DIR", str(tmp_path / "env_dir"))
  cifar.load_cifar("cifar10")
  assert os.listdir(tmp_path / "env_dir") == ["cifar-10-python.tar.gz"]


def test_cifar_no_network_names_url_and_folder(tmp_path, tiny_cifar, monkeypatch,
                                               dataset_cfg):
  def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
  monkeypatch.setattr(urllib.request, "urlopen", offline)
  data_dir = tmp_path / "data"
  url = cifar.ARCHIVES["cifar10"].url
  with pytest.raises(ValueError) as e:
    data.dataset_info(dataset_cfg("cifar10", "cifar", data_dir=str(data_dir),
                                  image_size=32))
  msg = str(e.value)
  assert f"Download {url}" in msg and f"put it in {data_dir}/" in msg
  assert "name resolution" in msg and "dataset.data_dir" in msg
  assert os.listdir(data_dir) == []  # No partial download left behind.


def test_cifar_checksum_mismatch(tmp_path, tiny_cifar, monkeypatch):
  good = cifar.ARCHIVES["cifar10"]
  monkeypatch.setitem(cifar.ARCHIVES, "cifar10",
                      dataclasses.replace(good, md5="0" * 32))
  data_dir = tmp_path / "data"
  with pytest.raises(ValueError, match=f"download of .* has md5 {good.md5}, "
                     f"expected 0{{32}}: it is corrupt"):
    cifar.load_cifar("cifar10", str(data_dir))
  assert os.listdir(data_dir) == []
  # An archive already in the data dir is checked too.
  shutil.copy(good.url[len("file://"):], data_dir / good.filename)
  with pytest.raises(ValueError, match="has md5 .* expected 0{32}.*Delete"):
    cifar.load_cifar("cifar10", str(data_dir))


def test_cifar_archive_cannot_run_code(tmp_path, monkeypatch):
  payload = pickle.dumps({b"data": os.system}, protocol=2)  # A foreign global.
  path = tmp_path / "cifar-10-python.tar.gz"
  with tarfile.open(path, "w:gz") as tar:
    for member in cifar.ARCHIVES["cifar10"].train_members:
      info = tarfile.TarInfo(member)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  monkeypatch.setitem(cifar.ARCHIVES, "cifar10", dataclasses.replace(
      cifar.ARCHIVES["cifar10"], md5=cifar.md5sum(str(path))))
  with pytest.raises(ValueError, match="global posix.system is not allowed"):
    cifar.load_cifar("cifar10", str(tmp_path), download=False)
