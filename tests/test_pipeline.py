"""irnet_jax.data.pipeline: deterministic, resumable, process-sharded train and eval
data sets; worker processes, uint8 batches, where the colour jitter runs, bad files.

Data is tiny and made here. Worker processes are started for real (grain's
``mp_prefetch``, 2 workers); each start costs ~1-2 s, so they are kept few.
"""
import ml_collections
import numpy as np
import pytest
from PIL import Image

from irnet_jax import data
from irnet_jax.data import augment as aug
from irnet_jax.data import decode, pipeline

MEAN = (0.25, 0.5, 0.75)
STD = (0.5, 0.25, 0.125)


def _cfg(**kwargs) -> ml_collections.ConfigDict:
  base = dict(name="npz", data_dir=None, path="", augment="imagenet",
              image_size=16, mean=MEAN, std=STD, num_threads=2,
              test_split="test", num_workers=0, prefetch_mb=64,
              color_jitter_on="device", jpeg_draft=False,
              skip_bad_files=False)
  base.update(kwargs)
  return ml_collections.ConfigDict(base)


def _npz(path, n_train=24, n_test=5):
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (n_train, 40, 48, 3), np.uint8),
           y_train=np.arange(n_train) % 3,
           x_test=rng.integers(0, 256, (n_test, 40, 48, 3), np.uint8),
           y_test=np.arange(n_test) % 3)
  return str(path)


def _ids(images: np.ndarray) -> np.ndarray:
  """Recovers the example index from a uint8 batch."""
  assert images.dtype == np.uint8
  return images[:, 0, 0, 0].astype(int)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ training


def test_train_determinism_and_sharding(tmp_path, write_indexed_npz):
  path = write_indexed_npz(tmp_path / "c.npz", side=32, n_train=40)
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


def test_train_epochs_reshuffle_and_resume(tmp_path, write_indexed_npz):
  npz_path = write_indexed_npz(tmp_path / "tiny.npz")
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


def test_train_uint8_batches_and_augmentation(tmp_path, write_indexed_npz):
  path = write_indexed_npz(tmp_path / "c.npz", side=32, n_train=40)
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


@pytest.mark.slow
def test_workers_same_batches_as_in_process_and_resume(tmp_path):
  cfg = _cfg(path=_npz(tmp_path / "d.npz"))
  ds = data.train_dataset(cfg, 8, seed=5, num_steps=7)  # 3 steps per epoch.
  expected = [ds[s] for s in range(7)]
  assert expected[0]["image"].dtype == np.uint8
  assert expected[0]["image"].shape == (8, 16, 16, 3)
  threads = list(data.train_iterator(ds, 0, num_threads=2))
  workers = list(data.train_iterator(ds, 0, num_workers=2, prefetch_batches=2))
  resumed = list(data.train_iterator(ds, 4, num_workers=2))
  assert len(threads) == len(workers) == 7 and len(resumed) == 3
  for s in range(7):
    assert _equal(threads[s], expected[s]) and _equal(workers[s], expected[s])
  for got, want in zip(resumed, expected[4:]):
    assert _equal(got, want)
  # Host-side sharding: the processes' batches concatenate to the global one.
  halves = [data.train_dataset(cfg, 8, 5, 7, k, 2)[6] for k in range(2)]
  joined = {k: np.concatenate([h[k] for h in halves]) for k in halves[0]}
  assert _equal(joined, expected[6])
  # Evaluation through workers too: uint8, in order, padding masked.
  cfg.num_workers = 2
  batches = list(data.eval_batches(cfg, 4))
  assert len(batches) == 2
  assert all(b["image"].dtype == np.uint8 for b in batches)
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in batches]),
                                [True] * 5 + [False] * 3)
  assert np.all(batches[1]["image"][1:] == 0)
  _, test = data.get_sources(cfg)
  np.testing.assert_array_equal(batches[1]["image"][0],
                                aug.resize_center_crop(test[4]["image"], 16))


def test_host_jitter_placement_changes_only_colours(tmp_path):
  path = _npz(tmp_path / "d.npz")
  on_device = data.train_dataset(_cfg(path=path), 8, 1, 2)[1]
  on_host = data.train_dataset(_cfg(path=path, color_jitter_on="host"), 8, 1,
                               2)[1]
  np.testing.assert_array_equal(on_device["label"], on_host["label"])
  diff = np.abs(on_device["image"].astype(int) - on_host["image"].astype(int))
  assert diff.mean() > 1  # Jittered on the host ...
  # ... by ColorJitter(0.2, 0.2, 0.2, 0.1), which keeps images recognisable.
  assert diff.mean() < 40
  assert data.color_jitter_on(_cfg(augment="cifar")) is None
  with pytest.raises(ValueError, match="color_jitter_on='gpu'"):
    data.dataset_info(_cfg(path=path, color_jitter_on="gpu"))


def test_loader_options(tmp_path, make_npz, write_image, monkeypatch):
  big = make_npz(tmp_path / "big.npz", n_train=4, n_test=2, size=80)
  opts = data.loader_options(_cfg(path=big, num_workers=-1, prefetch_mb=1), 4)
  assert opts["num_workers"] == pipeline.usable_cpus()  # 80-pixel images.
  # 1 MiB / (4 * 16 * 16 * 3 bytes) = 341 uint8 batches.
  assert opts["prefetch_batches"] == 341
  small = data.loader_options(_cfg(augment="cifar", num_workers=-1,
                                   image_size=224, prefetch_mb=1024), 2048)
  assert small["num_workers"] == 0  # In-memory recipes read in-process.
  assert small["prefetch_batches"] == 3  # 1024 MB of 308 MB batches.
  assert data.loader_options(_cfg(num_workers=3), 8)["num_workers"] == 3
  with pytest.raises(ValueError, match="prefetch_mb=0 must be positive"):
    data.dataset_info(_cfg(prefetch_mb=0, path="unused.npz"))


@pytest.mark.parametrize("side, workers", [(16, 0), (64, 0), (96, None)])
def test_imagenet_recipe_on_small_images_reads_in_process(tmp_path, monkeypatch, write_image,
                                                          make_npz, side, workers):
  """Issue 31: 16x16 files with augment=imagenet started worker processes (2-3 s a pool
  here, one per evaluation too) for ~0.1 ms of decoding an image. num_workers=-1 now
  picks workers only for stored images larger than SMALL_IMAGE_SIDE."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  for split in ("train", "val"):
    for i in range(3):
      write_image(tmp_path / "tree" / split / f"c{i % 2}" / f"{i}.png", side, side, seed=i)
  want = pipeline.usable_cpus() if workers is None else workers
  cfg = _cfg(name="imagefolder", path=str(tmp_path / "tree"), test_split="val",
             num_workers=-1)
  assert data.loader_options(cfg, 8)["num_workers"] == want
  npz = make_npz(tmp_path / "x.npz", n_train=4, n_test=2, size=side)
  assert data.loader_options(_cfg(path=npz, num_workers=-1), 8)["num_workers"] == want


# A run that uses worker processes, then exits; stderr is checked for the resource
# tracker's warning. Three ways to stop: every batch read (the iterator closes itself),
# evaluation, and an iterator left after one batch by an uncaught exception (Ctrl-C).
_WORKER_SCRIPT = """
import multiprocessing, sys
import ml_collections
from irnet_jax import data

def main():
  cfg = ml_collections.ConfigDict(dict(
      name="imagefolder", path=sys.argv[1], augment="imagenet", image_size=16,
      mean=(0.5,) * 3, std=(0.25,) * 3, num_threads=0, num_workers=2,
      test_split="val", prefetch_mb=64))
  ds = data.train_dataset(cfg, 4, seed=0, num_steps=3)
  batches = data.train_iterator(ds, 0, **data.loader_options(cfg, 4))
  held = [next(batches) for _ in range(3)]
  print("children after the last batch:", len(multiprocessing.active_children()))
  print("eval batches:", len(list(data.eval_batches(cfg, 4))))
  left = data.train_iterator(ds, 0, num_workers=1)
  held.append(next(left))
  raise KeyboardInterrupt("interrupted with batches held and an iterator open")

if __name__ == "__main__":
  main()
"""


def test_workers_leave_no_shared_memory_behind(tmp_path, repo_root, write_image):
  """Issue 31: a run with dataset.num_workers > 0 ended with "resource_tracker: There
  appear to be 10 leaked shared_memory objects": grain's iterators were never closed,
  and the batches' shared memory (unlinked by a deleter thread, some of it in reference
  cycles) outlived the interpreter."""
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  for split in ("train", "val"):
    for i in range(6):
      write_image(tmp_path / "tree" / split / f"c{i % 2}" / f"{i}.png", 16, 16, seed=i)
  script = tmp_path / "run_workers.py"
  script.write_text(_WORKER_SCRIPT)
  env = dict(os.environ, PYTHONPATH=repo_root, XDG_CACHE_HOME=str(tmp_path / "cache"))
  run = subprocess.run([sys.executable, str(script), str(tmp_path / "tree")], cwd=repo_root,
                       env=env, capture_output=True, text=True, timeout=300)
  assert "KeyboardInterrupt: interrupted with batches held" in run.stderr, run.stderr[-3000:]
  assert "children after the last batch: 0" in run.stdout
  assert "eval batches: 2" in run.stdout
  assert "leaked shared_memory" not in run.stderr, run.stderr[-3000:]


# ------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("batch, count", [(4, 1), (13, 1), (6, 2), (4, 4)])
def test_eval_batches_cover_test_set(tmp_path, batch, count, write_indexed_npz):
  npz_path = write_indexed_npz(tmp_path / "tiny.npz")
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


# ------------------------------------------------------------------ image files: bad files


def _tree(root, bad_in=("train",)):
  """2 classes x 6 small JPEGs per split, plus one corrupt file per split in
  ``bad_in`` (class b)."""
  rng = np.random.default_rng(1)
  for split in ("train", "val"):
    for cls in ("a", "b"):
      (root / split / cls).mkdir(parents=True)
      for i in range(6):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), np.uint8)).save(
            root / split / cls / f"{i}.JPEG", "JPEG")
    if split in bad_in:
      (root / split / "b" / "bad.JPEG").write_bytes(b"not a jpeg at all")
  return str(root)


@pytest.mark.slow
def test_bad_files_with_workers(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  root = _tree(tmp_path / "tree", bad_in=("train", "val"))
  cfg = _cfg(name="imagefolder", path=root, num_workers=2, test_split="val")
  ds = data.train_dataset(cfg, 13, seed=0, num_steps=2)  # 13 files: 1 epoch.
  # Default: the worker's error reaches this process, naming file and fix.
  with pytest.raises(decode.BadImageError) as e:
    list(data.train_iterator(ds, 0, num_workers=2))
  assert "tree/train/b/bad.JPEG" in str(e.value)
  assert "skip_bad_files=True" in str(e.value)
  # skip_bad_files: replaced (deterministically) and counted, once per epoch.
  cfg.skip_bad_files = True
  ds = data.train_dataset(cfg, 13, seed=0, num_steps=2)
  got = list(data.train_iterator(ds, 0, num_workers=2))
  assert [int(b["bad_files"].sum()) for b in got] == [1, 1]
  for step, batch in enumerate(got):
    assert _equal(batch, ds[step])
  # Evaluation leaves the bad file out (masked) instead of failing.
  cfg.num_workers = 0
  evals = list(data.eval_batches(cfg, 13))
  assert [int(b["mask"].sum()) for b in evals] == [12]
  cfg.skip_bad_files = False
  with pytest.raises(decode.BadImageError, match="val/b/bad.JPEG"):
    list(data.eval_batches(cfg, 13))


def test_postscript_named_jpg_is_skipped_and_counted(tmp_path, monkeypatch):
  # Issue 19: PIL opened it as EPS and ran Ghostscript, whose
  # CalledProcessError escaped skip_bad_files. Ghostscript is made to fail as
  # on a host that has it; the pipeline must not reach it at all.
  import subprocess  # pylint: disable=import-outside-toplevel

  from PIL import EpsImagePlugin  # pylint: disable=import-outside-toplevel

  def ghostscript(*args, **kwargs):
    raise subprocess.CalledProcessError(1, ["gs"])
  monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  root = _tree(tmp_path / "tree", bad_in=())
  for split in ("train", "val"):
    (tmp_path / "tree" / split / "b" / "x.jpg").write_bytes(
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\nshowpage\n")
  cfg = _cfg(name="imagefolder", path=root, test_split="val",
             skip_bad_files=True)
  batch = data.train_dataset(cfg, 13, seed=0, num_steps=1)[0]  # 13 files.
  assert int(batch["bad_files"].sum()) == 1
  assert [int(b["mask"].sum()) for b in data.eval_batches(cfg, 13)] == [12]
  cfg.skip_bad_files = False
  with pytest.raises(decode.BadImageError, match="train/b/x.jpg.*supported "
                     "format.*skip_bad_files=True"):
    data.train_dataset(cfg, 13, seed=0, num_steps=1)[0]  # pylint: disable=expression-not-assigned
