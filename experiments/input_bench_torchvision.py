"""torchvision's ImageFolder + DataLoader with the official IR-Net ImageNet
transforms: the reference for ``experiments/input_bench.py`` (same flags).

  python experiments/input_bench_torchvision.py --data=ROOT --workers=2 \
      --batch_size=64 --num_batches=10

Needs torch + torchvision (not dependencies of irnet_jax). Train:
RandomResizedCrop(224), RandomHorizontalFlip, ColorJitter(0.2, 0.2, 0.2, 0.1),
ToTensor, Normalize; eval: Resize(256), CenterCrop(224), ToTensor, Normalize;
``DataLoader(shuffle=True, num_workers=--workers)``. Timed after ``--warmup``
batches (worker start-up included there). Last line: JSON with
``train_images_per_sec``, ``eval_images_per_sec`` and ``cpu_ms_per_image``
(one worker's work timed with ``process_time`` in this process).
"""
import argparse
import json
import os
import time

import torch
from torchvision import datasets
from torchvision import transforms as T

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _rate(loader, warmup: int, count: int) -> float:
  it = iter(loader)
  for _ in range(warmup):
    next(it)
  start, images = time.perf_counter(), 0
  for _ in range(count):
    images += len(next(it)[1])
  return images / (time.perf_counter() - start)


def _cpu_per_image(dataset, batch: int, count: int) -> float:
  """CPU ms per image of what one DataLoader worker does (load, transforms,
  collate), in this process with one torch thread (as in a worker)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  order = torch.randperm(len(dataset)).tolist()
  collate = torch.utils.data.default_collate
  collate([dataset[i] for i in order[:batch]])  # Warm-up.
  start = time.process_time()
  for k in range(1, count):
    collate([dataset[i] for i in order[k * batch:(k + 1) * batch]])
  torch.set_num_threads(threads)
  return (time.process_time() - start) / ((count - 1) * batch) * 1e3


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data", required=True)
  p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--num_batches", type=int, default=10)
  p.add_argument("--warmup", type=int, default=0)
  a = p.parse_args()
  warmup = a.warmup or max(1, a.workers)
  torch.manual_seed(0)
  train = datasets.ImageFolder(os.path.join(a.data, "train"), T.Compose([
      T.RandomResizedCrop(224), T.RandomHorizontalFlip(),
      T.ColorJitter(0.2, 0.2, 0.2, 0.1), T.ToTensor(), T.Normalize(MEAN, STD)]))
  val = datasets.ImageFolder(os.path.join(a.data, "val"), T.Compose([
      T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)]))
  loader = lambda ds, shuffle: torch.utils.data.DataLoader(
      ds, batch_size=a.batch_size, shuffle=shuffle, num_workers=a.workers)
  out = {"workers": a.workers, "batch_size": a.batch_size,
         "num_batches": a.num_batches, "torch_threads": torch.get_num_threads()}
  out["train_images_per_sec"] = _rate(loader(train, True), warmup,
                                      a.num_batches)
  eval_batch = max(1, min(a.batch_size, len(val) // (warmup + 2)))
  count = min(a.num_batches, len(val) // eval_batch - warmup)
  out["eval_images_per_sec"] = _rate(torch.utils.data.DataLoader(
      val, batch_size=eval_batch, num_workers=a.workers), warmup, count)
  out["cpu_ms_per_image"] = _cpu_per_image(train, a.batch_size, 5)
  print(f"{'torchvision pipeline':44s} {'img/s':>8s} {'img/s/worker':>13s}")
  for name, key in (("train (official transforms)", "train_images_per_sec"),
                    ("eval (Resize 256, CenterCrop 224)", "eval_images_per_sec")):
    print(f"{name:44s} {out[key]:8.0f} {out[key] / max(1, a.workers):13.0f}")
  print(f"CPU per image, one worker's work: {out['cpu_ms_per_image']:.2f} ms "
        f"({1e3 / out['cpu_ms_per_image']:.0f} img/s per core)")
  print(json.dumps(out))


if __name__ == "__main__":
  main()
