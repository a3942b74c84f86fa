"""The input pipeline's speed features: worker processes, uint8 batches, the
on-device normalization and colour jitter, reduced-DCT decoding, bad files.

Data is tiny and made here. Worker processes are started for real (grain's
``mp_prefetch``, 2 workers); each start costs ~1-2 s, so they are kept few.
"""
import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image

from irnet_jax import config as config_lib
from irnet_jax import data
from irnet_jax import train
from irnet_jax.data import augment as aug
from irnet_jax.data import decode
from irnet_jax.data import decode_crop
from irnet_jax.data import device
from irnet_jax.data import pipeline

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


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


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


def test_loader_options():
  opts = data.loader_options(_cfg(num_workers=-1, prefetch_mb=1), 4)
  assert opts["num_workers"] == pipeline.usable_cpus()
  # 1 MiB / (4 * 16 * 16 * 3 bytes) = 341 uint8 batches.
  assert opts["prefetch_batches"] == 341
  small = data.loader_options(_cfg(augment="cifar", num_workers=-1,
                                   image_size=224, prefetch_mb=1024), 2048)
  assert small["num_workers"] == 0  # In-memory recipes read in-process.
  assert small["prefetch_batches"] == 3  # 1024 MB of 308 MB batches.
  assert data.loader_options(_cfg(num_workers=3), 8)["num_workers"] == 3
  with pytest.raises(ValueError, match="prefetch_mb=0 must be positive"):
    data.dataset_info(_cfg(prefetch_mb=0, path="unused.npz"))


# ----------------------------------------------------------------------------
# on the device


def test_model_input_is_the_host_normalization():
  images = np.random.default_rng(0).integers(0, 256, (2, 4, 4, 3), np.uint8)
  out = jax.jit(lambda x: device.model_input(x, MEAN, STD))(images)
  np.testing.assert_allclose(out, aug.normalize(images, MEAN, STD), rtol=1e-6,
                             atol=1e-6)


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


# ----------------------------------------------------------------------------
# reduced-DCT decoding


def _jpeg(width, height, seed=0):
  """A smooth JPEG (gradients + a few blobs): resampling differences stay
  small, as on photographs."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(width, height)
  image = np.stack([np.sin(6 * x + c) * np.cos(4 * y - c) for c in
                    rng.uniform(0, 3, 3)], -1)
  buf = io.BytesIO()
  Image.fromarray(((image + 1) * 127.5).astype(np.uint8)).save(
      buf, "JPEG", quality=90)
  return buf.getvalue()


def test_draft_scale():
  assert decode_crop.draft_scale((0, 0, 100, 100), 16) == 4
  assert decode_crop.draft_scale((0, 0, 100, 300), 16) == 4
  assert decode_crop.draft_scale((0, 0, 127, 900), 16) == 4
  assert decode_crop.draft_scale((0, 0, 128, 900), 16) == 8
  assert decode_crop.draft_scale((0, 0, 31, 900), 16) == 1


def test_decode_random_resized_crop_draft_close_to_full():
  data_ = _jpeg(640, 480)
  full_image = np.asarray(Image.open(io.BytesIO(data_)).convert("RGB"))
  used_draft = 0
  for seed in range(12):
    full = decode_crop.random_resized_crop(
        data_, "x.jpg", np.random.default_rng(seed), 32, draft=False)
    # Without draft: exactly the array path (same draws, same box).
    np.testing.assert_array_equal(full, aug.random_resized_crop(
        full_image, np.random.default_rng(seed), 32))
    draft = decode_crop.random_resized_crop(
        data_, "x.jpg", np.random.default_rng(seed), 32, draft=True)
    box = aug.random_resized_crop_box(480, 640, np.random.default_rng(seed))
    used_draft += decode_crop.draft_scale(box, 32) > 1
    assert np.abs(draft.astype(int) - full.astype(int)).mean() < 3
  assert used_draft >= 6


# ----------------------------------------------------------------------------
# the jitted steps on uint8 batches


def _train_config(**dataset):
  c = config_lib.base_config()
  fields = dict(name="digits", augment="none", image_size=16, mean=MEAN,
                std=STD)
  fields.update(dataset)
  c.dataset.update(fields)
  c.model.name, c.model.num_classes = "resnet20", 10
  c.batch_size = 8
  return c


@pytest.mark.slow
def test_steps_normalize_uint8_on_device():
  c = _train_config()
  setup = train.build(c, jax.devices()[:1], 10, 20)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (8, 16, 16, 3), np.uint8)
  labels = rng.integers(0, 10, 8).astype(np.int32)
  floats = aug.normalize(images, MEAN, STD)  # The old host path.
  state_u8, m_u8 = setup.train_step(jax.tree.map(jnp.copy, setup.state),
                                    {"image": images, "label": labels})
  state_f, m_f = setup.train_step(jax.tree.map(jnp.copy, setup.state),
                                  {"image": floats, "label": labels})
  np.testing.assert_allclose(m_u8["loss"], m_f["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state_u8), jax.tree.leaves(state_f)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  mask = np.ones(8, bool)
  e_u8 = setup.eval_step(state_u8[0], {"image": images, "label": labels,
                                       "mask": mask})
  e_f = setup.eval_step(state_u8[0], {"image": floats, "label": labels,
                                      "mask": mask})
  np.testing.assert_allclose(e_u8["loss"], e_f["loss"], rtol=1e-5)


@pytest.mark.slow
def test_train_step_device_jitter_one_compilation():
  c = _train_config(augment="imagenet", color_jitter_on="device")
  setup = train.build(c, jax.devices()[:1], 10, 20)
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 16, 16, 3), np.uint8),
           "label": rng.integers(0, 10, 8).astype(np.int32),
           "bad_files": np.array([0, 1, 0, 0, 0, 0, 1, 0], np.int32)}
  initial = jax.tree.map(jnp.copy, setup.state)
  state = setup.train_step(setup.state, batch)[0]
  for _ in range(2):
    state, metrics = setup.train_step(state, batch)
  assert setup.train_step._cache_size() == 1  # Jitter keyed by the traced step.
  assert int(metrics["bad_files"]) == 2
  # A rerun from the same state draws the same jitter (same loss).
  again = [setup.train_step(jax.tree.map(jnp.copy, initial), batch)[1]["loss"]
           for _ in range(2)]
  assert float(again[0]) == float(again[1])


# ----------------------------------------------------------------------------
# image files: decode-and-crop, bad files


def _encode(image: np.ndarray, mode: str, fmt: str = "JPEG") -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).convert(mode).save(buf, fmt)
  return buf.getvalue()


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "JPEG"),
                                       ("CMYK", "JPEG"), ("P", "PNG"),
                                       ("RGBA", "PNG")])
def test_decode_crop_equals_decode_then_augment(mode, fmt):
  rng = np.random.default_rng(0)
  encoded = _encode(rng.integers(0, 256, (37, 51, 3), np.uint8), mode, fmt)
  decoded = decode.decode_image(encoded)
  for seed in range(3):
    np.testing.assert_array_equal(
        decode_crop.random_resized_crop(encoded, "f", np.random.default_rng(
            seed), 16),
        aug.random_resized_crop(decoded, np.random.default_rng(seed), 16))
  np.testing.assert_array_equal(decode_crop.resize_center_crop(encoded, "f", 16),
                                aug.resize_center_crop(decoded, 16))
  with pytest.raises(decode.BadImageError, match="'dir/broken.jpg'"):
    decode_crop.random_resized_crop(encoded[:len(encoded) // 2],
                                    "dir/broken.jpg", rng, 16)


def _tree(root, bad_in=("train",)):
  """2 classes x 6 small JPEGs per split, plus one corrupt file per split in
  ``bad_in`` (class b)."""
  rng = np.random.default_rng(1)
  for split in ("train", "val"):
    for cls in ("a", "b"):
      (root / split / cls).mkdir(parents=True)
      for i in range(6):
        (root / split / cls / f"{i}.JPEG").write_bytes(_encode(
            rng.integers(0, 256, (30 + i, 40, 3), np.uint8), "RGB"))
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
