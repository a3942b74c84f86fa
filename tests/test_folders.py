"""File-based sources: decoding, ImageFolder / list-file indexes, CIFAR archives."""
import dataclasses
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request

import ml_collections
import numpy as np
import pytest
from PIL import Image

from irnet_jax import config as config_lib
from irnet_jax import data
from irnet_jax import train
from irnet_jax.data import cifar
from irnet_jax.data import decode
from irnet_jax.data import folders
from irnet_jax.data import index_cache
from irnet_jax.data import sources


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


def _gradient(h=24, w=40) -> np.ndarray:
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 255 // (w - 1), y * 255 // (h - 1),
                   (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


# ----------------------------------------------------------------------------
# decode


def test_decode_modes_match_pil_convert_rgb():
  rgb = Image.fromarray(_gradient())
  cases = {
      "rgb_png": _encode(rgb, "PNG"),
      "rgba_png": _encode(rgb.convert("RGBA"), "PNG"),
      "palette_png": _encode(rgb.convert("P"), "PNG"),
      "grey_jpeg": _encode(rgb.convert("L"), "JPEG", quality=95),
      "cmyk_jpeg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
      "rgb_jpeg": _encode(rgb, "JPEG", quality=95),
  }
  for name, data in cases.items():
    out = decode.decode_image(data, name)
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3), name
    assert out.flags.writeable
    # The torchvision pil_loader reference: open + convert("RGB").
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(out, expected, err_msg=name)
  # Lossless formats keep the pixels; grey is replicated; CMYK stays close.
  np.testing.assert_array_equal(decode.decode_image(cases["rgb_png"]),
                                _gradient())
  grey = decode.decode_image(cases["grey_jpeg"])
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  cmyk = decode.decode_image(cases["cmyk_jpeg"]).astype(int)
  assert np.abs(cmyk - _gradient()).mean() < 4


def test_decode_draft_reduces_jpeg_only():
  big = Image.fromarray(np.repeat(np.repeat(_gradient(), 8, 0), 8, 1))  # 192x320
  jpeg = _encode(big, "JPEG", quality=90)
  assert decode.decode_image(jpeg).shape == (192, 320, 3)
  # Largest 1/2^k scale with both sides >= the request: 1/4 -> 48x80.
  assert decode.decode_image(jpeg, draft_to=(70, 40)).shape == (48, 80, 3)
  assert decode.decode_image(jpeg, draft_to=(320, 192)).shape == (192, 320, 3)
  png = _encode(big, "PNG")
  assert decode.decode_image(png, draft_to=(70, 40)).shape == (192, 320, 3)


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
def test_decode_bad_bytes_names_file_and_fix(tmp_path, kind):
  jpeg = _encode(Image.fromarray(_gradient(64, 64)), "JPEG")
  data = {"empty": b"", "garbage": b"not an image at all",
          "truncated": jpeg[:len(jpeg) // 2]}[kind]
  path = tmp_path / "bad.JPEG"
  path.write_bytes(data)
  with pytest.raises(decode.BadImageError, match="skip_bad_files=True") as e:
    decode.load_image(path)
  assert e.value.path == str(path) and str(path) in str(e.value)
  # Survives the trip back from a worker process.
  again = pickle.loads(pickle.dumps(e.value))
  assert isinstance(again, decode.BadImageError) and again.path == str(path)
  assert str(again) == str(e.value)


def test_unreadable_file_is_a_bad_image(tmp_path):
  with pytest.raises(decode.BadImageError, match="missing.jpg"):
    decode.load_image(tmp_path / "missing.jpg")


# ----------------------------------------------------------------------------
# ImageFolder trees


def _jpeg(path, h=20, w=28, seed=0, mode="RGB"):
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).convert(mode)
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path, "PNG" if path.suffix.lower() == ".png" else "JPEG")
  return path


def _age(root, seconds=100):
  """Backdates every file and folder under ``root``: the index cache skips
  trees modified in the last seconds (mtime races)."""
  when = time.time() - seconds
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      os.utime(os.path.join(folder, name), (when, when))
  os.utime(root, (when, when))


def _tree(root, split="train"):
  """Class names whose sorted order differs from creation order and from a
  case-insensitive or natural sort; mixed-case extensions; a nested folder."""
  files = ["b/1.JPEG", "a/y.jpg", "a/x.jpeg", "a/sub/w.PNG", "a/z.txt",
           "a10/k.Jpg", "a2/q.png", "B/m.JPEG", "B/notes"]
  for i, f in enumerate(files):
    path = root / split / f
    if f.endswith((".txt", "notes")):
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("not an image")
    else:
      _jpeg(path, seed=i)
  _age(root)
  return root / split


def test_image_folder_order_is_torchvision_imagefolder(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  split = _tree(tmp_path / "data")
  index = folders.index_image_folder(str(split))
  # torchvision: classes = sorted(scandir dirs) (code point order), samples
  # walk each class with sorted(os.walk(...)) and sorted file names.
  assert index.classes == ("B", "a", "a10", "a2", "b")
  assert [(index.relpath(i), int(index.labels[i])) for i in range(len(index))] == [
      ("B/m.JPEG", 0), ("a/x.jpeg", 1), ("a/y.jpg", 1), ("a/sub/w.PNG", 1),
      ("a10/k.Jpg", 2), ("a2/q.png", 3), ("b/1.JPEG", 4)]
  assert index.path(0) == str(split / "B" / "m.JPEG")
  source = folders.FileSource(index)
  example = source[3]
  assert example["label"] == 1 and example["image"].shape == (20, 28, 3)
  assert source.read(0) == (split / "B" / "m.JPEG").read_bytes()
  # The index pickles compactly (numpy arrays), for worker processes.
  again = pickle.loads(pickle.dumps(source))
  assert again.path(6) == source.path(6) and again.label(6) == 4


def _no_scan(monkeypatch):
  def fail(*args):
    raise AssertionError("rescanned although the cache is valid")
  monkeypatch.setattr(folders, "_scan_image_folder", fail)


def test_image_folder_cache_reused_and_invalidated(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  split = _tree(tmp_path / "data")
  first = folders.index_image_folder(str(split))
  cached = list((tmp_path / "data" / index_cache.TREE_DIR).iterdir())
  assert len(cached) == 1 and cached[0].suffix == ".npz"
  with monkeypatch.context() as m:
    _no_scan(m)
    hit = folders.index_image_folder(str(split))
  assert hit.relpaths() == first.relpaths() and hit.classes == first.classes
  np.testing.assert_array_equal(hit.labels, first.labels)
  # A new file deep in a class folder, a removed file, a new class: all seen.
  for change in (lambda: _jpeg(split / "a" / "sub" / "v.jpg"),
                 lambda: (split / "b" / "1.JPEG").rename(split / "b" / "2.JPEG"),
                 lambda: _jpeg(split / "c" / "n.jpg")):
    before = folders.index_image_folder(str(split)).relpaths()
    change()
    _age(split)
    after = folders.index_image_folder(str(split)).relpaths()
    assert after != before
    assert after == folders.index_image_folder(str(split), cache=False).relpaths()
  assert folders.index_image_folder(str(split)).classes[-1] == "c"
  # A damaged cache entry is ignored and rewritten.
  for entry in (tmp_path / "data" / index_cache.TREE_DIR).iterdir():
    entry.write_bytes(b"garbage")
  assert folders.index_image_folder(str(split)).relpaths() == after
  with monkeypatch.context() as m:
    _no_scan(m)
    assert folders.index_image_folder(str(split)).relpaths() == after


def test_read_only_tree_caches_in_user_dir(tmp_path, monkeypatch):
  home = tmp_path / "home_cache"
  monkeypatch.setenv("XDG_CACHE_HOME", str(home))
  split = _tree(tmp_path / "data")
  # The tree's cache folder cannot be created (a file is in the way): as in a
  # read-only tree (the tests may run as root, which ignores permissions).
  (tmp_path / "data" / index_cache.TREE_DIR).write_text("in the way")
  first = folders.index_image_folder(str(split))
  stored = list((home / "irnet_jax" / "index").iterdir())
  assert len(stored) == 1
  with monkeypatch.context() as m:
    _no_scan(m)
    assert folders.index_image_folder(str(split)).relpaths() == first.relpaths()


def _cfg(**kwargs):
  base = dict(name="imagefolder", data_dir="", path="", augment="imagenet",
              image_size=16, mean=(0.5,) * 3, std=(0.25,) * 3, num_threads=0,
              num_workers=0, train_split="train", test_split="")
  base.update(kwargs)
  return ml_collections.ConfigDict(base)


def test_image_folder_dataset_end_to_end(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root = tmp_path / "data"
  _tree(root, "train")
  for i, (cls, size) in enumerate([("B", (40, 25)), ("a", (17, 33)),
                                   ("a10", (64, 64)), ("a2", (16, 50)),
                                   ("b", (21, 21))]):
    _jpeg(root / "val" / cls / f"v{i}.JPEG", *size, seed=10 + i,
          mode="L" if i == 1 else "CMYK" if i == 2 else "RGB")
  cfg = _cfg(path=str(root))
  assert data.dataset_info(cfg) == data.DatasetInfo(7, 5, 5, (16, 16, 3))
  batch = data.train_dataset(cfg, 4, seed=0, num_steps=3)[2]
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype.kind in "fu"
  assert set(batch["label"].tolist()) <= set(range(5))
  evals = list(data.eval_batches(cfg, 4))
  assert [b["label"][b["mask"]].tolist() for b in evals] == [[0, 1, 2, 3], [4]]
  assert all(b["image"].shape == (4, 16, 16, 3) for b in evals)
  # Split folder names are configurable.
  (root / "val").rename(root / "validation")
  info = data.dataset_info(_cfg(path=str(root), test_split="validation"))
  assert info.num_test == 5


@pytest.mark.parametrize("problem,message", [
    ("no_path", "needs ds_cfg.path"),
    ("missing_root", "does not exist"),
    ("no_split", "has no 'val' folder .*holds: train\\).*dataset.test_split"),
    ("no_classes", "no class sub-folders"),
    ("empty_class", "1 class folder.*hold no image files \\('empty'\\)"),
    ("class_mismatch", "only in train: \\['b'\\], only in eval: \\['c'\\]"),
])
def test_image_folder_errors(tmp_path, monkeypatch, problem, message):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root = tmp_path / "data"
  _jpeg(root / "train" / "a" / "1.jpg")
  _jpeg(root / "train" / "b" / "1.jpg")
  _jpeg(root / "val" / "a" / "1.jpg")
  _jpeg(root / "val" / "b" / "1.jpg")
  path = str(root)
  if problem == "no_path":
    path = ""
  elif problem == "missing_root":
    path = str(tmp_path / "nope")
  elif problem == "no_split":
    shutil.rmtree(root / "val")
  elif problem == "no_classes":
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    (root / "val" / "stray.jpg").write_bytes(b"")
  elif problem == "empty_class":
    (root / "train" / "empty").mkdir()
    (root / "train" / "empty" / "readme.txt").write_text("x")
  elif problem == "class_mismatch":
    shutil.rmtree(root / "val" / "b")
    _jpeg(root / "val" / "c" / "1.jpg")
  with pytest.raises(ValueError, match=message):
    data.dataset_info(_cfg(path=path))


# ----------------------------------------------------------------------------
# list files


def _lists(tmp_path):
  root = tmp_path / "imgs"
  for i, rel in enumerate(["train/n1/a.JPEG", "train/n1/b b.JPEG",
                           "train/n2/c.png", "val/v1.JPEG", "val/v2.JPEG"]):
    _jpeg(root / rel, 18 + i, 30, seed=i)
  train_list = tmp_path / "train.txt"
  train_list.write_text("n1/a.JPEG 0\nn1/b b.JPEG 0\n\n  n2/c.png   2  \n")
  val_list = tmp_path / "val.txt"
  val_list.write_text("v2.JPEG 1\nv1.JPEG 2\n")
  _age(tmp_path)
  return root, train_list, val_list


def test_file_list_dataset(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root, train_list, val_list = _lists(tmp_path)
  cfg = _cfg(name="filelist", train_list=str(train_list), test_list=str(val_list),
             train_root=str(root / "train"), test_root=str(root / "val"))
  assert data.dataset_info(cfg) == data.DatasetInfo(3, 2, 3, (16, 16, 3))
  train, test = sources.get_sources(cfg)
  assert [train.path(i) for i in range(3)] == [
      str(root / "train/n1/a.JPEG"), str(root / "train/n1/b b.JPEG"),
      str(root / "train/n2/c.png")]
  assert [train.label(i) for i in range(3)] == [0, 0, 2]
  assert test[0]["image"].shape == (22, 30, 3) and test[0]["label"] == 1
  evals = list(data.eval_batches(cfg, 2))
  assert evals[0]["label"].tolist() == [1, 2]
  assert data.train_dataset(cfg, 2, 0, 2)[1]["image"].shape == (2, 16, 16, 3)
  # One root for both lists (dataset.path), paths then carry the split folder.
  both = tmp_path / "both.txt"
  both.write_text("train/n1/a.JPEG 0\nval/v1.JPEG 1\n")
  info = data.dataset_info(_cfg(name="filelist", path=str(root),
                                train_list=str(both), test_list=str(both)))
  assert (info.num_train, info.num_classes) == (2, 2)


def test_file_list_cache_follows_the_list(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root, train_list, _ = _lists(tmp_path)
  first = folders.index_file_list(str(root / "train"), str(train_list))
  with monkeypatch.context() as m:
    m.setattr(folders, "_parse_list", None)  # Any parse would fail.
    hit = folders.index_file_list(str(root / "train"), str(train_list))
  assert hit.relpaths() == first.relpaths() == ["n1/a.JPEG", "n1/b b.JPEG",
                                                "n2/c.png"]
  train_list.write_text("n2/c.png 1\n")
  _age(tmp_path)
  assert folders.index_file_list(str(root / "train"),
                                 str(train_list)).relpaths() == ["n2/c.png"]
  (root / "train/n2/c.png").unlink()  # The folder changed: checked again.
  with pytest.raises(ValueError, match="line 1: 'n2/c.png'"):
    folders.index_file_list(str(root / "train"), str(train_list))


@pytest.mark.parametrize("lines,message", [
    ("n1/a.JPEG 0\nn1/b b.JPEG\n", "train.txt:2: malformed line 'n1/b b.JPEG'"),
    ("n1/a.JPEG zero\n", ":1: malformed"),
    ("n1/a.JPEG 0\nn1/a.JPEG -1\n", ":2: malformed.*>= 0"),
    ("\n\n", "names no images"),
    ("n1/a.JPEG 0\nn1/missing.JPEG 1\nn9/x.JPEG 1\n",
     "2 file\\(s\\) named in .* do not exist .*line 2: 'n1/missing.JPEG'; "
     "line 3: 'n9/x.JPEG'"),
    ("n1/a.JPEG 0\n", "has label 2 but the labels of .* stop at 0"),
])
def test_file_list_errors(tmp_path, monkeypatch, lines, message):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root, train_list, val_list = _lists(tmp_path)
  train_list.write_text(lines)
  cfg = _cfg(name="filelist", train_list=str(train_list), test_list=str(val_list),
             train_root=str(root / "train"), test_root=str(root / "val"))
  with pytest.raises(ValueError, match=message):
    data.dataset_info(cfg)


def test_file_list_missing_fields(tmp_path):
  with pytest.raises(ValueError, match="needs dataset.train_list"):
    data.dataset_info(_cfg(name="filelist", path=str(tmp_path)))
  with pytest.raises(ValueError, match="list file .* does not exist"):
    data.dataset_info(_cfg(name="filelist", path=str(tmp_path),
                           train_list=str(tmp_path / "no.txt"),
                           test_list=str(tmp_path / "no.txt")))


def test_tree_modified_just_now_is_not_cached(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  split = _tree(tmp_path / "data")
  _jpeg(split / "a" / "fresh.jpg")  # Same clock tick as a scan could be.
  folders.index_image_folder(str(split))
  assert not (tmp_path / "data" / index_cache.TREE_DIR).exists()
  _age(split)
  folders.index_image_folder(str(split))
  assert len(list((tmp_path / "data" / index_cache.TREE_DIR).iterdir())) == 1


# ----------------------------------------------------------------------------
# CIFAR python archives


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
def test_cifar_archive_download_and_read(tmp_path, tiny_cifar, name):
  data_dir = tmp_path / "data"
  x_train, y_train, x_test, y_test = cifar.load_cifar(name, str(data_dir))
  # Downloaded once into the data dir (no partial files left), then reused.
  assert sorted(os.listdir(data_dir)) == [cifar.ARCHIVES[name].filename]
  for got, want in zip((x_train, y_train, x_test, y_test), tiny_cifar[name]):
    np.testing.assert_array_equal(got, want)
  assert x_train.shape == (15 if name == "cifar10" else 3, 32, 32, 3)
  assert x_train.dtype == np.uint8 and y_train.dtype == np.int32
  cfg = _cfg(name=name, data_dir=str(data_dir), augment="cifar", image_size=32)
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


def test_cifar_no_network_names_url_and_folder(tmp_path, tiny_cifar, monkeypatch):
  def offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
  monkeypatch.setattr(urllib.request, "urlopen", offline)
  data_dir = tmp_path / "data"
  url = cifar.ARCHIVES["cifar10"].url
  with pytest.raises(ValueError) as e:
    data.dataset_info(_cfg(name="cifar10", data_dir=str(data_dir),
                           augment="cifar", image_size=32))
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


# ----------------------------------------------------------------------------
# tfds imagenet2012 vs ImageFolder class ids


def test_tfds_imagenet2012_labels_match_image_folder_ids(tmp_path, monkeypatch):
  """tfds labels an ImageNet example by ClassLabel.str2int(wnid) over its
  labels file; an ImageFolder tree of the same wnid folders gives each folder
  the same id, so checkpoints carry over between the two sources."""
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  label = tfds.builder("imagenet2012", data_dir=str(tmp_path / "tfds")
                       ).info.features["label"]
  assert label.num_classes == 1000
  split = tmp_path / "imagenet" / "train"
  for wnid in reversed(label.names):  # Creation order must not matter.
    (split / wnid).mkdir(parents=True)
    (split / wnid / f"{wnid}_1.JPEG").write_bytes(b"")
  index = folders.index_image_folder(str(split), cache=False)
  for i in range(len(index)):
    wnid = index.relpath(i).split("/")[0]
    assert label.str2int(wnid) == index.labels[i] == index.classes.index(wnid)
  assert index.classes[:2] == ("n01440764", "n01443537")
  assert "tensorflow" not in sys.modules


# ----------------------------------------------------------------------------
# the launcher on image files (ResNet-18, small images)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SMALL_RUN = {"dataset.image_size": 32, "batch_size": 4, "eval_batch_size": 4,
              "num_train_steps": 2, "eval_every_steps": 2, "log_every_steps": 1,
              "optimizer.warmup_steps": 1, "dataset.num_threads": 0,
              "dataset.num_workers": 0, "num_devices": 1, "progress_bar": False}


def _jpeg_imagenet(root):
  """3 classes x (3 train + 2 val) ImageNet-like files: various sizes, a
  greyscale and a CMYK JPEG, a PNG with alpha."""
  sizes = [(40, 30), (30, 45), (36, 36), (50, 38), (33, 47)]
  for c, wnid in enumerate(["n03000134", "n01440764", "n02102040"]):
    for i, (h, w) in enumerate(sizes):
      split, name = ("train", f"{wnid}_{i}") if i < 3 else ("val", f"val_{c}{i}")
      mode = {(0, 1): "L", (1, 2): "CMYK"}.get((c, i), "RGB")
      if (c, i) == (2, 0):
        _jpeg(root / split / wnid / f"{name}.png", h, w, seed=5 * c + i, mode="RGBA")
      else:
        _jpeg(root / split / wnid / f"{name}.JPEG", h, w, seed=5 * c + i, mode=mode)
  return root


def _check_run(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in rows)
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    final = json.load(f)
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["num_classes"] == 3
  return final


@pytest.mark.slow
def test_launcher_trains_resnet18_from_image_folder(tmp_path):
  root = _jpeg_imagenet(tmp_path / "imagenet")
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "irnet_jax.main",
         "--config=imagenet_resnet18", f"--workdir={workdir}",
         "--config.dataset.name=imagefolder", f"--config.dataset.path={root}"]
  # One worker process: files are read and decoded outside the main process.
  cmd += [f"--config.{k}={v}" for k, v in
          dict(_SMALL_RUN, **{"dataset.num_workers": 1}).items()]
  env = dict(os.environ, PYTHONPATH=REPO, XDG_CACHE_HOME=str(tmp_path / "cache"),
             JAX_COMPILATION_CACHE_DIR=os.environ.get(
                 "IRNET_TEST_JAX_CACHE", "/tmp/irnet_jax_test_cache"))
  run = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "test_accuracy=" in run.stdout
  final = _check_run(workdir)
  assert 0.0 <= final["test_accuracy"] <= 1.0


def test_labels_beyond_model_classes_fail_before_compiling(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  c = config_lib.imagenet_config("resnet18")
  c.dataset.path = str(_jpeg_imagenet(tmp_path / "imagenet"))
  c.model.num_classes = 2
  with pytest.raises(ValueError, match="labels up to 2 but config.model.num_classes=2"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_train_resnet18_from_file_list(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  root = _jpeg_imagenet(tmp_path / "imagenet")
  lists = {}
  for split in ("train", "val"):
    index = folders.index_image_folder(str(root / split), cache=False)
    lists[split] = tmp_path / f"{split}.txt"
    lists[split].write_text("".join(f"{index.relpath(i)} {index.labels[i]}\n"
                                    for i in range(len(index))))
  c = config_lib.imagenet_config("resnet18")
  c.dataset.name = "filelist"
  c.dataset.train_list, c.dataset.test_list = str(lists["train"]), str(lists["val"])
  c.dataset.train_root, c.dataset.test_root = str(root / "train"), str(root / "val")
  for key, value in _SMALL_RUN.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  final = train.train_and_evaluate(c, str(tmp_path / "run"))
  _check_run(tmp_path / "run")
  assert 0.0 <= final["test_accuracy"] <= 1.0


# ----------------------------------------------------------------------------
# issue 19: symlink loops and duplicates in image trees, non-image formats


def test_image_folder_symlink_loop_ends(tmp_path, monkeypatch):
  # os.walk(followlinks=True) follows a/sub/loop -> a again and again (until
  # the kernel's 40-link limit, or for ever with two such links per folder).
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  split = tmp_path / "data" / "train"
  _jpeg(split / "a" / "1.jpg")
  _jpeg(split / "a" / "sub" / "2.jpg", seed=1)
  _jpeg(split / "b" / "3.jpg", seed=2)
  (split / "a" / "sub" / "loop").symlink_to("..", target_is_directory=True)
  (split / "b" / "up").symlink_to("..", target_is_directory=True)  # The split.
  index = folders.index_image_folder(str(split), cache=False)
  assert [(index.relpath(i), int(index.labels[i])) for i in range(len(index))] == [
      ("a/1.jpg", 0), ("a/sub/2.jpg", 0), ("b/3.jpg", 1)]


def test_image_folder_file_reached_twice_through_links_counted_once(
    tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  split = tmp_path / "data" / "train"
  _jpeg(split / "a" / "sub" / "1.jpg")
  _jpeg(split / "b" / "2.jpg", seed=1)
  _jpeg(tmp_path / "extra" / "3.jpg", seed=2)
  # A folder linked twice (the link sorts before the real folder: the image
  # keeps its real path), a file linked, another class linked.
  (split / "a" / "0link").symlink_to("sub", target_is_directory=True)
  (split / "a" / "sub" / "0copy.jpg").symlink_to("1.jpg")
  (split / "a" / "other_class").symlink_to("../b", target_is_directory=True)
  # A folder outside the tree is followed, once.
  (split / "b" / "ext").symlink_to(tmp_path / "extra", target_is_directory=True)
  (split / "b" / "ext2").symlink_to(tmp_path / "extra", target_is_directory=True)
  index = folders.index_image_folder(str(split))
  want = [("a/sub/1.jpg", 0), ("b/2.jpg", 1), ("b/ext/3.jpg", 1)]
  assert [(index.relpath(i), int(index.labels[i])) for i in range(len(index))] == want
  # Without links, the walk is os.walk's (torchvision's order, _tree above).
  plain = folders.index_image_folder(str(_tree(tmp_path / "plain")), cache=False)
  walked = [os.path.relpath(os.path.join(root, f), tmp_path / "plain" / "train")
            for cls in plain.classes
            for root, _, files in sorted(os.walk(tmp_path / "plain" / "train" / cls))
            for f in sorted(files) if f.lower().endswith(folders.IMG_EXTENSIONS)]
  assert plain.relpaths() == walked


def _postscript(path):
  """A minimal EPS file: PIL's EpsImagePlugin would hand it to Ghostscript."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
                   b"0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")
  return path


def _ghostscript_fails(monkeypatch) -> list:
  """Ghostscript as on a host that has it and fails on the file (the error
  that escaped skip_bad_files); returns the calls made to it."""
  from PIL import EpsImagePlugin  # pylint: disable=import-outside-toplevel
  calls = []

  def ghostscript(*args, **kwargs):
    calls.append(args)
    raise subprocess.CalledProcessError(1, ["gs"])
  monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
  return calls


def test_postscript_named_jpg_is_a_bad_image(tmp_path, monkeypatch):
  from irnet_jax.data import decode_crop  # pylint: disable=import-outside-toplevel
  calls = _ghostscript_fails(monkeypatch)
  path = _postscript(tmp_path / "x.jpg")
  with pytest.raises(decode.BadImageError, match="supported format") as e:
    decode.load_image(path)
  assert str(path) in str(e.value) and "skip_bad_files=True" in str(e.value)
  rng = np.random.default_rng(0)
  with pytest.raises(decode.BadImageError, match="x.jpg.*supported format"):
    decode_crop.random_resized_crop(path.read_bytes(), str(path), rng, 8)
  with pytest.raises(decode.BadImageError, match="x.jpg.*supported format"):
    decode_crop.resize_center_crop(path.read_bytes(), str(path), 8)
  assert not calls  # PIL never got as far as running Ghostscript.
  # What ImageNet holds still decodes: a PNG named .JPEG, CMYK and grey JPEGs.
  image = _gradient(16, 16)
  png = tmp_path / "png.JPEG"
  png.write_bytes(_encode(Image.fromarray(image), "PNG"))
  np.testing.assert_array_equal(decode.load_image(png), image)
  for mode in ("CMYK", "L"):
    encoded = _encode(Image.fromarray(image).convert(mode), "JPEG")
    assert decode.decode_image(encoded).shape == (16, 16, 3)
    assert decode_crop.resize_center_crop(encoded, "f", 8).shape == (8, 8, 3)


def test_source_table_drives_every_dispatcher(tmp_path, monkeypatch):
  """One row of sources.SOURCES per name: opening, inspection, the default eval split,
  whether the data is in memory, and the class count the summary reads."""
  from irnet_jax import summary  # pylint: disable=import-outside-toplevel
  assert data.DATASETS == tuple(sources.SOURCES)
  assert sources.source_spec("imagenet2012") is sources.SOURCES["tfds:imagenet2012"]
  assert sources.source_spec("tfds:mnist").num_classes is None
  assert sources.tfds_name("imagenet2012") == "imagenet2012"
  assert sources.tfds_name("tfds:") is None and sources.tfds_name("npz") is None
  with pytest.raises(ValueError, match="Unknown dataset ds_cfg.name='tfds:'"):
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
  _tree(root, "train")
  _tree(root, "val")
  with pytest.raises(ValueError, match=r"in-memory data set \(cifar10, cifar100, npz, "
                     r"digits\); 'imagefolder' is read from files"):
    data.resident_arrays(_cfg(path=str(root), augment="imagenet"))
  arrays = data.resident_arrays(_cfg(name="digits", augment="none"))
  assert arrays["train_image"].shape[1:] == (16, 16, 3)
