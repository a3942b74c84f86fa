"""Images/s of the ImageNet input pipeline on an ImageFolder tree.

  python experiments/input_bench.py --data=ROOT --workers=2 --batch_size=64 \
      --num_batches=10

``ROOT`` holds ``train/<class>/*.JPEG`` and ``val/<class>/*.JPEG`` (an ImageNet
ImageFolder tree, or a synthetic one of ImageNet-sized JPEGs). Measures, after
``--warmup`` untimed batches (worker start-up included there):

* train: the library's training pipeline with the official recipe
  (header -> RandomResizedCrop box -> decode -> crop/resize 224 -> flip ->
  uint8 batch in ``--workers`` grain processes -> ``jax.device_put``), with
  the colour jitter on the device (default; its cost is measured separately
  below, on whatever device JAX has) and with it on the host (in the workers);
* train with ``dataset.jpeg_draft=False`` (exact full decodes), and the
  draft's pixel difference and CPU cost per image (:func:`draft_report`);
* eval: Resize(256) + CenterCrop(224) batches -> device;
* the on-device part on this machine's JAX backend: uint8 -> colour jitter ->
  normalize of one batch, jitted (on an accelerator it runs inside the step);
* CPU time per image of one worker's work, in this process (``process_time``:
  unaffected by other load on a shared machine), with the jitter on the
  device and on the host.

Prints a table, then one JSON line with ``train_images_per_sec`` (default
placement), ``eval_images_per_sec`` and the other numbers. The torchvision
equivalent is ``experiments/input_bench_torchvision.py`` (same flags).
"""
from __future__ import annotations

import argparse
import json
import os
import time


def _config(root: str, workers: int, **overrides):
  import ml_collections  # pylint: disable=g-import-not-at-top

  from irnet_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  c = config_lib.imagenet_config("resnet18").dataset
  c = ml_collections.ConfigDict(c.to_dict())
  c.name, c.path, c.num_workers = "imagefolder", root, workers
  c.update(overrides)
  return c


def _time_batches(batches, warmup: int, count: int, put) -> tuple[float, int]:
  """Seconds for ``count`` batches after ``warmup``, and the images seen."""
  for _ in range(warmup):
    put(next(batches))
  start, images = time.perf_counter(), 0
  for _ in range(count):
    images += put(next(batches))
  return time.perf_counter() - start, images


def _put(batch) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  jax.block_until_ready(jax.device_put({k: batch[k] for k in ("image", "label")}))
  return len(batch["label"])


def bench_train(root: str, workers: int, batch: int, warmup: int, count: int,
                **overrides) -> float:
  from irnet_jax import data  # pylint: disable=g-import-not-at-top
  c = _config(root, workers, **overrides)
  ds = data.train_dataset(c, batch, seed=0, num_steps=warmup + count)
  it = data.train_iterator(ds, 0, **data.loader_options(c, batch))
  seconds, images = _time_batches(it, warmup, count, _put)
  return images / seconds


def bench_eval(root: str, workers: int, batch: int, warmup: int,
               count: int) -> float:
  """Eval batches/s; the batch shrinks to fit ``warmup + 2`` batches in val/."""
  from irnet_jax import data  # pylint: disable=g-import-not-at-top
  c = _config(root, workers)
  num_test = data.dataset_info(c).num_test
  batch = max(1, min(batch, num_test // (warmup + 2)))
  count = min(count, num_test // batch - warmup)
  it = iter(data.eval_batches(c, batch))
  seconds, images = _time_batches(it, warmup, count, _put)
  return images / seconds


def cpu_per_image(root: str, batch: int, count: int, **overrides) -> float:
  """CPU ms per image of what one worker does (read, decode, crop, flip,
  stack), in this process: robust to other load on the machine."""
  from irnet_jax import data  # pylint: disable=g-import-not-at-top
  c = _config(root, 0, **overrides)
  ds = data.train_dataset(c, batch, seed=0, num_steps=count)
  ds[0]  # Warm caches (permutation, imports).
  start = time.process_time()
  for step in range(1, count):
    ds[step]
  return (time.process_time() - start) / ((count - 1) * batch) * 1e3


def bench_device_jitter(batch: int, repeats: int = 5) -> float:
  """Images/s of uint8 -> colour jitter -> normalize, jitted, on JAX's device."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from irnet_jax.data import device  # pylint: disable=g-import-not-at-top
  images = jax.device_put(np.random.default_rng(0).integers(
      0, 256, (batch, 224, 224, 3), np.uint8))
  fn = jax.jit(lambda x, step: device.model_input(
      x, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
      device.jitter_key(0, step)))
  jax.block_until_ready(fn(images, jnp.asarray(0)))
  start = time.perf_counter()
  for step in range(repeats):
    out = fn(images, jnp.asarray(step + 1))
  jax.block_until_ready(out)
  return batch * repeats / (time.perf_counter() - start)


def draft_report(root: str, count: int = 300, size: int = 224) -> dict:
  """Reduced-DCT decoding on the first ``count`` train files, one process:
  CPU ms per image of RandomResizedCrop with and without ``jpeg_draft``, the
  share of crops it applies to and the mean absolute difference (uint8 levels)
  of those crops from the full decode's."""
  import glob  # pylint: disable=g-import-not-at-top,multiple-imports
  import io

  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  from irnet_jax.data import augment, decode_crop  # pylint: disable=g-import-not-at-top
  files = sorted(glob.glob(os.path.join(root, "train", "*", "*")))[:count]
  blobs = [open(f, "rb").read() for f in files]
  out = {}
  crops = {}
  for draft in (False, True):
    start = time.process_time()
    crops[draft] = [decode_crop.random_resized_crop(
        b, "f", np.random.default_rng(i), size, draft)
                    for i, b in enumerate(blobs)]
    out[f"ms_per_image_{'draft' if draft else 'full'}"] = (
        (time.process_time() - start) / len(blobs) * 1e3)
  used = []
  for i, b in enumerate(blobs):
    w, h = Image.open(io.BytesIO(b)).size
    box = augment.random_resized_crop_box(h, w, np.random.default_rng(i))
    used.append(decode_crop.draft_scale(box, size) > 1)
  used = np.array(used)
  diffs = np.array([np.abs(a.astype(int) - b.astype(int)).mean()
                    for a, b in zip(crops[False], crops[True])])
  out["draft_share"] = float(used.mean())
  out["draft_mean_abs_diff"] = float(diffs[used].mean()) if used.any() else 0.0
  return out


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", required=True, help="ImageFolder root (train/, val/).")
  p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--num_batches", type=int, default=10, help="Timed batches.")
  p.add_argument("--warmup", type=int, default=0,
                 help="Untimed batches first (default: one per worker).")
  p.add_argument("--skip", default="", help="Comma list of parts to skip: "
                 "host_jitter,draft,eval,device,cpu.")
  a = p.parse_args()
  warmup = a.warmup or max(1, a.workers)
  skip = set(filter(None, a.skip.split(",")))
  args = (a.data, a.workers, a.batch_size, warmup, a.num_batches)
  out = {"workers": a.workers, "batch_size": a.batch_size,
         "num_batches": a.num_batches, "usable_cpus": len(os.sched_getaffinity(0))}
  out["train_images_per_sec"] = bench_train(*args)
  if "host_jitter" not in skip:
    out["train_host_jitter_images_per_sec"] = bench_train(
        *args, color_jitter_on="host")
  if "draft" not in skip:
    out["train_no_draft_images_per_sec"] = bench_train(*args, jpeg_draft=False)
  if "draft" not in skip:
    out.update(draft_report(a.data))
  if "cpu" not in skip:
    out["cpu_ms_per_image"] = cpu_per_image(a.data, a.batch_size, 6)
    out["cpu_ms_per_image_host_jitter"] = cpu_per_image(
        a.data, a.batch_size, 4, color_jitter_on="host")
  if "eval" not in skip:
    out["eval_images_per_sec"] = bench_eval(*args)
  if "device" not in skip:
    import jax  # pylint: disable=g-import-not-at-top
    out["device_jitter_images_per_sec"] = bench_device_jitter(a.batch_size)
    out["device"] = str(jax.devices()[0].platform)
  rows = [("train (defaults: jitter on device, jpeg_draft)",
           "train_images_per_sec"),
          ("train, jpeg_draft=False", "train_no_draft_images_per_sec"),
          ("train, jitter on host", "train_host_jitter_images_per_sec"),
          ("eval (resize 256, crop 224)", "eval_images_per_sec"),
          (f"on-device jitter+normalize ({out.get('device')})",
           "device_jitter_images_per_sec")]
  print(f"{'pipeline':48s} {'img/s':>8s} {'img/s/worker':>13s}")
  for name, key in rows:
    if key in out:
      per = "" if key.startswith("device") else f"{out[key] / a.workers:13.0f}"
      print(f"{name:48s} {out[key]:8.0f} {per}")
  if "cpu_ms_per_image" in out:
    print(f"CPU per image, one worker's work: {out['cpu_ms_per_image']:.2f} ms "
          f"({1e3 / out['cpu_ms_per_image']:.0f} img/s per core); with the "
          f"jitter on the host {out['cpu_ms_per_image_host_jitter']:.2f} ms")
  if "draft_share" in out:
    print(f"jpeg_draft: applies to {out['draft_share']:.1%} of the crops, "
          f"mean |diff| there {out['draft_mean_abs_diff']:.2f} levels; CPU "
          f"{out['ms_per_image_full']:.2f} -> {out['ms_per_image_draft']:.2f} "
          f"ms/image (decode + crop, one process)")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
