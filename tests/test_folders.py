"""irnet_jax.data.folders (and its index_cache): torchvision ImageFolder trees and
``path label`` list files, their cached indexes, symlinks in the tree; the data sets
``imagefolder`` and ``filelist`` they make, and the launcher training on them."""
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest

from irnet_jax import config as config_lib
from irnet_jax import data, train
from irnet_jax.data import folders, index_cache, sources

# ------------------------------------------------------------------ ImageFolder trees


def test_image_folder_order_is_torchvision_imagefolder(tmp_path, monkeypatch, image_tree):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  split = image_tree(tmp_path / "data")
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


def test_image_folder_symlink_loop_ends(tmp_path, monkeypatch, write_image):
  # os.walk(followlinks=True) follows a/sub/loop -> a again and again (until
  # the kernel's 40-link limit, or for ever with two such links per folder).
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  split = tmp_path / "data" / "train"
  write_image(split / "a" / "1.jpg")
  write_image(split / "a" / "sub" / "2.jpg", seed=1)
  write_image(split / "b" / "3.jpg", seed=2)
  (split / "a" / "sub" / "loop").symlink_to("..", target_is_directory=True)
  (split / "b" / "up").symlink_to("..", target_is_directory=True)  # The split.
  index = folders.index_image_folder(str(split), cache=False)
  assert [(index.relpath(i), int(index.labels[i])) for i in range(len(index))] == [
      ("a/1.jpg", 0), ("a/sub/2.jpg", 0), ("b/3.jpg", 1)]


def test_image_folder_file_reached_twice_through_links_counted_once(tmp_path, monkeypatch,
                                                                    write_image, image_tree):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  split = tmp_path / "data" / "train"
  write_image(split / "a" / "sub" / "1.jpg")
  write_image(split / "b" / "2.jpg", seed=1)
  write_image(tmp_path / "extra" / "3.jpg", seed=2)
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
  # Without links, the walk is os.walk's (torchvision's order, conftest's image_tree).
  plain = folders.index_image_folder(str(image_tree(tmp_path / "plain")), cache=False)
  walked = [os.path.relpath(os.path.join(root, f), tmp_path / "plain" / "train")
            for cls in plain.classes
            for root, _, files in sorted(os.walk(tmp_path / "plain" / "train" / cls))
            for f in sorted(files) if f.lower().endswith(folders.IMG_EXTENSIONS)]
  assert plain.relpaths() == walked


def test_image_folder_dataset_end_to_end(tmp_path, monkeypatch, write_image, image_tree,
                                         dataset_cfg):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root = tmp_path / "data"
  image_tree(root, "train")
  for i, (cls, size) in enumerate([("B", (40, 25)), ("a", (17, 33)),
                                   ("a10", (64, 64)), ("a2", (16, 50)),
                                   ("b", (21, 21))]):
    write_image(root / "val" / cls / f"v{i}.JPEG", *size, seed=10 + i,
          mode="L" if i == 1 else "CMYK" if i == 2 else "RGB")
  cfg = dataset_cfg("imagefolder", "imagenet", path=str(root))
  assert data.dataset_info(cfg) == data.DatasetInfo(7, 5, 5, (16, 16, 3))
  batch = data.train_dataset(cfg, 4, seed=0, num_steps=3)[2]
  assert batch["image"].shape == (4, 16, 16, 3) and batch["image"].dtype.kind in "fu"
  assert set(batch["label"].tolist()) <= set(range(5))
  evals = list(data.eval_batches(cfg, 4))
  assert [b["label"][b["mask"]].tolist() for b in evals] == [[0, 1, 2, 3], [4]]
  assert all(b["image"].shape == (4, 16, 16, 3) for b in evals)
  # Split folder names are configurable.
  (root / "val").rename(root / "validation")
  info = data.dataset_info(dataset_cfg("imagefolder", "imagenet", path=str(root),
                                       test_split="validation"))
  assert info.num_test == 5


@pytest.mark.parametrize("problem,message", [
    ("no_path", "needs --config.dataset.path"),
    ("missing_root", "does not exist"),
    ("no_split", "has no 'val' folder .*holds: train\\).*dataset.test_split"),
    ("no_classes", "no class sub-folders"),
    ("empty_class", "1 class folder.*hold no image files \\('empty'\\)"),
    ("class_mismatch", "only in train: \\['b'\\], only in eval: \\['c'\\]"),
])
def test_image_folder_errors(tmp_path, monkeypatch, problem, message, write_image,
                             dataset_cfg):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root = tmp_path / "data"
  write_image(root / "train" / "a" / "1.jpg")
  write_image(root / "train" / "b" / "1.jpg")
  write_image(root / "val" / "a" / "1.jpg")
  write_image(root / "val" / "b" / "1.jpg")
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
    write_image(root / "val" / "c" / "1.jpg")
  with pytest.raises(ValueError, match=message):
    data.dataset_info(dataset_cfg("imagefolder", "imagenet", path=path))


def _square_tree(root, write_image, side=32, per_split=4, fmt="png"):
  """2 classes of ``side`` x ``side`` images per split (as a CIFAR-style folder)."""
  for split in ("train", "val"):
    for i in range(per_split):
      write_image(root / split / f"c{i % 2}" / f"{i}.{fmt}", side, side, seed=i)
  return root


@pytest.mark.parametrize("augment", ["none", "cifar", "shift"])
def test_equal_size_image_folder_with_small_image_recipes(tmp_path, monkeypatch, write_image,
                                                          dataset_cfg, augment):
  """Issue 31: 32x32 files were refused with "images vary in size" for any recipe but
  imagenet: the folder's sizes were never read. They are read (a sample of the headers)
  and the images used as they are."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  root = _square_tree(tmp_path / "data", write_image)
  cfg = dataset_cfg("imagefolder", augment, path=str(root), image_size=32)
  assert data.dataset_info(cfg) == data.DatasetInfo(4, 4, 2, (32, 32, 3))
  batch = data.train_dataset(cfg, 4, seed=0, num_steps=2)[1]
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
  evals = list(data.eval_batches(cfg, 4))
  assert len(evals) == 1 and evals[0]["mask"].all()
  _, test = sources.get_sources(cfg)
  np.testing.assert_array_equal(evals[0]["image"][2], test[2]["image"])  # As stored.
  # A recipe that does not resize and another image_size: the real problem and fix.
  with pytest.raises(ValueError, match=r"images are 32x32 \(e\.g\. .*data/train/c0/0\.png\) "
                     r"but --config\.dataset\.image_size=16, and --config\.dataset\.augment="
                     rf"{augment} uses each stored image as it is \(no resize\): set "
                     r"--config\.dataset\.image_size=32, or set "
                     r"--config\.dataset\.augment=imagenet"):
    data.dataset_info(dataset_cfg("imagefolder", augment, path=str(root), image_size=16))
  # The imagenet recipe resizes: any image_size.
  small = dataset_cfg("imagefolder", "imagenet", path=str(root), image_size=16)
  assert data.dataset_info(small).image_shape == (16, 16, 3)


def test_image_folder_sizes_that_really_vary(tmp_path, monkeypatch, write_image, dataset_cfg):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  root = _square_tree(tmp_path / "data", write_image)
  write_image(root / "val" / "c1" / "odd.jpg", 20, 28)
  cfg = dataset_cfg("imagefolder", "cifar", path=str(root), image_size=32)
  with pytest.raises(ValueError, match=r"images vary in size \(.*train/c0/0\.png is 32x32; "
                     r".*val/c1/odd\.jpg is 20x28\), but --config\.dataset\.augment=cifar .*"
                     r"every image must be 32x32 .*--config\.dataset\.augment=imagenet"):
    data.dataset_info(cfg)
  # A file the sample did not see (here: changed after the check) fails when decoded,
  # naming it, in training and in evaluation.
  (root / "val" / "c1" / "odd.jpg").unlink()
  train_ds, eval_ds = data.train_dataset(cfg, 4, seed=0, num_steps=1), data.eval_dataset(cfg, 4)
  write_image(root / "train" / "c1" / "1.png", 30, 30)
  write_image(root / "val" / "c1" / "3.png", 30, 30)
  with pytest.raises(ValueError, match=r"train/c1/1\.png is 30x30, but --config\.dataset\."
                     r"augment=cifar uses each stored image as it is .* model input is 32x32"):
    train_ds[0]  # pylint: disable=pointless-statement
  with pytest.raises(ValueError, match=r"val/c1/3\.png is 30x30"):
    eval_ds[0]  # pylint: disable=pointless-statement


def test_image_folder_split_folders_by_train_root_and_test_root(tmp_path, monkeypatch,
                                                                 write_image, dataset_cfg):
  """Issue 31's command: --config.dataset.train_root / test_root name the split
  folders of an ImageFolder tree (they were ignored: "needs ds_cfg.path")."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  root = _square_tree(tmp_path / "data", write_image, side=16)
  (root / "val").rename(tmp_path / "elsewhere")
  cfg = dataset_cfg("imagefolder", "shift", train_root=str(root / "train"),
                    test_root=str(tmp_path / "elsewhere"))
  assert data.dataset_info(cfg) == data.DatasetInfo(4, 4, 2, (16, 16, 3))
  train_source, test_source = sources.get_sources(cfg)
  assert test_source.path(0) == str(tmp_path / "elsewhere" / "c0" / "0.png")
  assert train_source.path(3) == str(root / "train" / "c1" / "3.png")
  with pytest.raises(ValueError, match=r"needs --config\.dataset\.path.*"
                     r"--config\.dataset\.train_root="
                     r".*dataset\.test_root is empty"):
    data.dataset_info(dataset_cfg("imagefolder", "shift", train_root=str(root / "train")))
  with pytest.raises(ValueError, match=r"dataset\.test_root='.*nope' does not exist"):
    data.dataset_info(dataset_cfg("imagefolder", "shift", train_root=str(root / "train"),
                                  test_root=str(tmp_path / "nope")))


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


# ------------------------------------------------------------------ list files


@pytest.fixture(name="lists")
def fixture_lists(tmp_path, write_image, age_files):
  """(image root, train list, val list) of 5 images under tmp_path."""
  root = tmp_path / "imgs"
  for i, rel in enumerate(["train/n1/a.JPEG", "train/n1/b b.JPEG",
                           "train/n2/c.png", "val/v1.JPEG", "val/v2.JPEG"]):
    write_image(root / rel, 18 + i, 30, seed=i)
  train_list = tmp_path / "train.txt"
  train_list.write_text("n1/a.JPEG 0\nn1/b b.JPEG 0\n\n  n2/c.png   2  \n")
  val_list = tmp_path / "val.txt"
  val_list.write_text("v2.JPEG 1\nv1.JPEG 2\n")
  age_files(tmp_path)
  return root, train_list, val_list


def test_file_list_dataset(tmp_path, monkeypatch, lists, dataset_cfg):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root, train_list, val_list = lists
  cfg = dataset_cfg("filelist", "imagenet", train_list=str(train_list),
                    test_list=str(val_list), train_root=str(root / "train"),
                    test_root=str(root / "val"))
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
  info = data.dataset_info(dataset_cfg("filelist", "imagenet", path=str(root),
                                       train_list=str(both), test_list=str(both)))
  assert (info.num_train, info.num_classes) == (2, 2)


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
def test_file_list_errors(tmp_path, monkeypatch, lines, message, lists, dataset_cfg):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root, train_list, val_list = lists
  train_list.write_text(lines)
  cfg = dataset_cfg("filelist", "imagenet", train_list=str(train_list),
                    test_list=str(val_list), train_root=str(root / "train"),
                    test_root=str(root / "val"))
  with pytest.raises(ValueError, match=message):
    data.dataset_info(cfg)


def test_file_list_missing_fields(tmp_path, dataset_cfg):
  with pytest.raises(ValueError, match="needs --config.dataset.train_list"):
    data.dataset_info(dataset_cfg("filelist", "imagenet", path=str(tmp_path)))
  with pytest.raises(ValueError, match="list file .* does not exist"):
    data.dataset_info(dataset_cfg("filelist", "imagenet", path=str(tmp_path),
                                  train_list=str(tmp_path / "no.txt"),
                                  test_list=str(tmp_path / "no.txt")))


# ------------------------------------------------------------------ the index cache (index_cache)


def _no_scan(monkeypatch):
  def fail(*args):
    raise AssertionError("rescanned although the cache is valid")
  monkeypatch.setattr(folders, "_scan_image_folder", fail)


def test_image_folder_cache_reused_and_invalidated(tmp_path, monkeypatch, write_image, image_tree,
                                                   age_files):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  split = image_tree(tmp_path / "data")
  first = folders.index_image_folder(str(split))
  cached = list((tmp_path / "data" / index_cache.TREE_DIR).iterdir())
  assert len(cached) == 1 and cached[0].suffix == ".npz"
  with monkeypatch.context() as m:
    _no_scan(m)
    hit = folders.index_image_folder(str(split))
  assert hit.relpaths() == first.relpaths() and hit.classes == first.classes
  np.testing.assert_array_equal(hit.labels, first.labels)
  # A new file deep in a class folder, a removed file, a new class: all seen.
  for change in (lambda: write_image(split / "a" / "sub" / "v.jpg"),
                 lambda: (split / "b" / "1.JPEG").rename(split / "b" / "2.JPEG"),
                 lambda: write_image(split / "c" / "n.jpg")):
    before = folders.index_image_folder(str(split)).relpaths()
    change()
    age_files(split)
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


def test_read_only_tree_caches_in_user_dir(tmp_path, monkeypatch, image_tree):
  home = tmp_path / "home_cache"
  monkeypatch.setenv("XDG_CACHE_HOME", str(home))
  split = image_tree(tmp_path / "data")
  # The tree's cache folder cannot be created (a file is in the way): as in a
  # read-only tree (the tests may run as root, which ignores permissions).
  (tmp_path / "data" / index_cache.TREE_DIR).write_text("in the way")
  first = folders.index_image_folder(str(split))
  stored = list((home / "irnet_jax" / "index").iterdir())
  assert len(stored) == 1
  with monkeypatch.context() as m:
    _no_scan(m)
    assert folders.index_image_folder(str(split)).relpaths() == first.relpaths()


def test_file_list_cache_follows_the_list(tmp_path, monkeypatch, age_files, lists):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  root, train_list, _ = lists
  first = folders.index_file_list(str(root / "train"), str(train_list))
  with monkeypatch.context() as m:
    m.setattr(folders, "_parse_list", None)  # Any parse would fail.
    hit = folders.index_file_list(str(root / "train"), str(train_list))
  assert hit.relpaths() == first.relpaths() == ["n1/a.JPEG", "n1/b b.JPEG",
                                                "n2/c.png"]
  train_list.write_text("n2/c.png 1\n")
  age_files(tmp_path)
  assert folders.index_file_list(str(root / "train"),
                                 str(train_list)).relpaths() == ["n2/c.png"]
  (root / "train/n2/c.png").unlink()  # The folder changed: checked again.
  with pytest.raises(ValueError, match="line 1: 'n2/c.png'"):
    folders.index_file_list(str(root / "train"), str(train_list))


def test_tree_modified_just_now_is_not_cached(tmp_path, monkeypatch, write_image, image_tree,
                                              age_files):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
  split = image_tree(tmp_path / "data")
  write_image(split / "a" / "fresh.jpg")  # Same clock tick as a scan could be.
  folders.index_image_folder(str(split))
  assert not (tmp_path / "data" / index_cache.TREE_DIR).exists()
  age_files(split)
  folders.index_image_folder(str(split))
  assert len(list((tmp_path / "data" / index_cache.TREE_DIR).iterdir())) == 1


# ------------------------------------------------------------------ the launcher on image files
#
# ResNet-18 on small images.

_SMALL_RUN = {"dataset.image_size": 32, "batch_size": 4, "eval_batch_size": 4,
              "num_train_steps": 2, "eval_every_steps": 2, "log_every_steps": 1,
              "optimizer.warmup_steps": 1, "dataset.num_threads": 0,
              "dataset.num_workers": 0, "num_devices": 1, "progress_bar": False}


def _jpeg_imagenet(root, write_image):
  """3 classes x (3 train + 2 val) ImageNet-like files: various sizes, a
  greyscale and a CMYK JPEG, a PNG with alpha."""
  sizes = [(40, 30), (30, 45), (36, 36), (50, 38), (33, 47)]
  for c, wnid in enumerate(["n03000134", "n01440764", "n02102040"]):
    for i, (h, w) in enumerate(sizes):
      split, name = ("train", f"{wnid}_{i}") if i < 3 else ("val", f"val_{c}{i}")
      mode = {(0, 1): "L", (1, 2): "CMYK"}.get((c, i), "RGB")
      if (c, i) == (2, 0):
        write_image(root / split / wnid / f"{name}.png", h, w, seed=5 * c + i, mode="RGBA")
      else:
        write_image(root / split / wnid / f"{name}.JPEG", h, w, seed=5 * c + i, mode=mode)
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
def test_launcher_trains_resnet18_from_image_folder(tmp_path, repo_root, write_image):
  root = _jpeg_imagenet(tmp_path / "imagenet", write_image)
  workdir = tmp_path / "run"
  cmd = [sys.executable, "-m", "irnet_jax.main",
         "--config=imagenet_resnet18", f"--workdir={workdir}",
         "--config.dataset.name=imagefolder", f"--config.dataset.path={root}"]
  # One worker process: files are read and decoded outside the main process.
  cmd += [f"--config.{k}={v}" for k, v in
          dict(_SMALL_RUN, **{"dataset.num_workers": 1}).items()]
  env = dict(os.environ, PYTHONPATH=repo_root, XDG_CACHE_HOME=str(tmp_path / "cache"))
  run = subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "test_accuracy=" in run.stdout
  assert "leaked shared_memory" not in run.stderr, run.stderr[-3000:]  # Issue 31.
  final = _check_run(workdir)
  assert 0.0 <= final["test_accuracy"] <= 1.0


def test_labels_beyond_model_classes_fail_before_compiling(tmp_path, monkeypatch, write_image):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  c = config_lib.imagenet_config("resnet18")
  c.dataset.path = str(_jpeg_imagenet(tmp_path / "imagenet", write_image))
  c.model.num_classes = 2
  with pytest.raises(ValueError, match="labels up to 2 but config.model.num_classes=2"):
    train.train_and_evaluate(c, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_train_resnet18_from_file_list(tmp_path, monkeypatch, write_image):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  root = _jpeg_imagenet(tmp_path / "imagenet", write_image)
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
