"""Writes torchvision_augment.npz: reference values for tests/test_augment.py.

Run with torchvision installed (it is not a dependency of irnet_jax)::

  /work/venv-tv/bin/python tests/testdata/make_torchvision_augment.py

(torch 2.14.1, torchvision 0.29.1 when it was made). Contents, all from
torchvision itself:

* ``rrc_*``: ``RandomResizedCrop.get_params`` boxes ``(top, left, h, w)`` for
  various image sizes / scales / ratios, with every random draw torch made for
  them (recorded by wrapping ``Tensor.uniform_`` and ``torch.randint``), so a
  test can replay the same draws through our box function.
* ``crop_*``: ``F.resized_crop`` of a PIL image (bilinear) for given boxes.
* ``eval_*``: ``Resize(short) + CenterCrop(size)`` of PIL images.
* ``jitter_*``: ``F.adjust_brightness/contrast/saturation/hue`` on a float
  tensor image in [0, 1], applied in a given order with given factors
  (what ``ColorJitter.forward`` does after drawing them).
"""
import os

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import functional as F
from torchvision.transforms import transforms as T

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                   "torchvision_augment.npz")


def record_draws(fn):
  """Calls fn() and returns (result, draws): draws are (kind, lo, hi, value)."""
  draws = []
  uniform, randint = torch.Tensor.uniform_, torch.randint

  def rec_uniform(self, lo=0.0, hi=1.0, **kw):
    out = uniform(self, lo, hi, **kw)
    draws.append((0, float(lo), float(hi), float(out.item())))
    return out

  def rec_randint(lo, hi, size, **kw):
    out = randint(lo, hi, size, **kw)
    draws.append((1, float(lo), float(hi), float(out.item())))
    return out

  torch.Tensor.uniform_, torch.randint = rec_uniform, rec_randint
  try:
    return fn(), draws
  finally:
    torch.Tensor.uniform_, torch.randint = uniform, randint


def main():
  arrays = {}
  # RandomResizedCrop boxes: ImageNet-like sizes, extreme aspect ratios and
  # scales that force the centre-crop fallback.
  cases = [(375, 500, (0.08, 1.0), (3 / 4, 4 / 3))] * 40
  cases += [(500, 333, (0.08, 1.0), (3 / 4, 4 / 3))] * 20
  cases += [(10, 100, (0.9, 1.0), (3 / 4, 4 / 3))] * 5    # Too wide: fallback.
  cases += [(120, 15, (0.9, 1.0), (3 / 4, 4 / 3))] * 5    # Too tall: fallback.
  cases += [(50, 60, (0.95, 1.0), (0.5, 0.55))] * 5       # In-range fallback.
  cases += [(40, 40, (0.5, 1.0), (1.0, 1.0))] * 5
  sizes, boxes, offsets, draws_all = [], [], [0], []
  for k, (h, w, scale, ratio) in enumerate(cases):
    torch.manual_seed(k)
    img = torch.zeros(3, h, w)
    box, draws = record_draws(
        lambda: T.RandomResizedCrop.get_params(img, list(scale), list(ratio)))
    sizes.append((h, w, *scale, *ratio))
    boxes.append(box)
    draws_all += draws
    offsets.append(len(draws_all))
  arrays["rrc_cases"] = np.asarray(sizes, np.float64)
  arrays["rrc_boxes"] = np.asarray(boxes, np.int64)
  arrays["rrc_draws"] = np.asarray(draws_all, np.float64)
  arrays["rrc_offsets"] = np.asarray(offsets, np.int64)

  rng = np.random.default_rng(0)
  # resized_crop on PIL (what RandomResizedCrop does with the box).
  crop_image = rng.integers(0, 256, (37, 53, 3), np.uint8)
  crop_boxes = np.asarray([(0, 0, 37, 53), (3, 5, 20, 30), (10, 40, 27, 13),
                           (1, 2, 8, 9)], np.int64)
  arrays["crop_image"] = crop_image
  arrays["crop_boxes"] = crop_boxes
  arrays["crop_out"] = np.stack([
      np.asarray(F.resized_crop(Image.fromarray(crop_image), *map(int, b),
                                [16, 16], T.InterpolationMode.BILINEAR))
      for b in crop_boxes])

  # Eval: Resize(32) + CenterCrop(28) (224/256 scaled down) on PIL images.
  eval_out = []
  for i, (h, w) in enumerate([(45, 61), (80, 37), (32, 40), (29, 29)]):
    image = rng.integers(0, 256, (h, w, 3), np.uint8)
    arrays[f"eval_image{i}"] = image
    t = T.Compose([T.Resize(32), T.CenterCrop(28)])
    eval_out.append(np.asarray(t(Image.fromarray(image))))
  arrays["eval_out"] = np.stack(eval_out)

  # Colour jitter: the four ops in a given order on a float image.
  jit_image = rng.integers(0, 256, (9, 11, 3), np.uint8)
  jit_image[0, :3] = [[0, 0, 0], [255, 255, 255], [7, 7, 7]]  # Grey pixels.
  jit_image[1, :3] = [[255, 0, 0], [0, 255, 0], [0, 0, 255]]
  fns = [F.adjust_brightness, F.adjust_contrast, F.adjust_saturation,
         F.adjust_hue]
  orders, factors, outs = [], [], []
  for k in range(8):
    torch.manual_seed(100 + k)
    j = T.ColorJitter(0.2, 0.2, 0.2, 0.1)
    order, *fs = j.get_params(j.brightness, j.contrast, j.saturation, j.hue)
    x = torch.from_numpy(jit_image).permute(2, 0, 1).float() / 255.0
    for op in order.tolist():
      x = fns[op](x, fs[op])
    orders.append(order.numpy())
    factors.append(fs)
    outs.append(x.permute(1, 2, 0).numpy())
  arrays["jitter_image"] = jit_image
  arrays["jitter_orders"] = np.asarray(orders, np.int64)
  arrays["jitter_factors"] = np.asarray(factors, np.float64)
  arrays["jitter_out"] = np.asarray(outs, np.float32)
  arrays["versions"] = np.asarray([torch.__version__,
                                   torchvision.__version__])
  np.savez_compressed(OUT, **arrays)
  print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes)")


if __name__ == "__main__":
  main()
