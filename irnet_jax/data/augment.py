"""Pure numpy image augmentations and normalization.

Images are single HWC uint8 arrays in [0, 255] (one NHWC example); batches are
NHWC. Every random function takes an explicit ``np.random.Generator`` and draws
from nothing else, so the output is a deterministic function of
``(image, rng state)``; inputs are never modified. Resizing uses Pillow's
bilinear filter (antialiased when shrinking, like torchvision on PIL images).

Recipes (``ds_cfg.augment``), mirroring the torchvision pipelines of the
official IR-Net code:

* ``"cifar"``: zero-pad 4, random ``size x size`` crop, random horizontal flip
  (``RandomCrop(32, padding=4) + RandomHorizontalFlip``).
* ``"imagenet"``: ``RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3))``,
  horizontal flip, ``ColorJitter(0.4, 0.4, 0.4)``; eval resizes the shorter side
  to ``size / 0.875`` and centre-crops ``size``.
* ``"shift"``: zero-pad 1 and random crop (small translations, no flip: digits
  are not mirror-symmetric).
* ``"none"``: identity.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import numpy as np
from PIL import Image

AUGMENTS = ("cifar", "imagenet", "shift", "none")

# ITU-R 601 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)

TrainTransform = Callable[[np.ndarray, np.random.Generator], np.ndarray]
EvalTransform = Callable[[np.ndarray], np.ndarray]


def pad_random_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                    pad: int) -> np.ndarray:
  """Zero-pads ``pad`` pixels on every side, then crops a random ``size^2``.

  Args:
    image: uint8 ``(H, W, C)`` with ``H + 2 pad >= size`` and ``W + 2 pad >= size``.
    rng: draws the crop's top and left offsets (uniform, in that order).
    size: side of the output, in pixels.
    pad: zero border width, in pixels.

  Returns:
    uint8 ``(size, size, C)``; pixels that come from the border are 0.
  """
  h, w, c = image.shape
  if h + 2 * pad < size or w + 2 * pad < size:
    raise ValueError(f"Cannot crop {size}x{size} from {h}x{w} padded by {pad}.")
  padded = np.zeros((h + 2 * pad, w + 2 * pad, c), image.dtype)
  padded[pad:pad + h, pad:pad + w] = image
  top = int(rng.integers(0, h + 2 * pad - size + 1))
  left = int(rng.integers(0, w + 2 * pad - size + 1))
  return padded[top:top + size, left:left + size]


def random_flip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Mirrors ``(H, W, C)`` left-right with probability 1/2 (one draw)."""
  return image[:, ::-1] if rng.random() < 0.5 else image


def cifar_augment(image: np.ndarray, rng: np.random.Generator, size: int = 32,
                  pad: int = 4) -> np.ndarray:
  """``RandomCrop(size, padding=pad)`` then ``RandomHorizontalFlip``; uint8 HWC."""
  return random_flip(pad_random_crop(image, rng, size, pad), rng)


def shift_augment(image: np.ndarray, rng: np.random.Generator, size: int,
                  pad: int = 1) -> np.ndarray:
  """Random translation by up to ``pad`` pixels (zero fill), no flip; uint8 HWC."""
  return pad_random_crop(image, rng, size, pad)


def _resize(image: np.ndarray, width: int, height: int,
            box: tuple[float, float, float, float] | None = None) -> np.ndarray:
  """Bilinear resize of uint8 ``(H, W, 3)`` (optionally of the ``box`` region,
  given as ``(left, top, right, bottom)`` pixels) to ``(height, width, 3)``."""
  pil = Image.fromarray(np.ascontiguousarray(image))
  return np.asarray(pil.resize((width, height), Image.Resampling.BILINEAR,
                               box=box))


def random_resized_crop_box(
    height: int, width: int, rng: np.random.Generator,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Samples a crop ``(top, left, h, w)`` like torchvision's RandomResizedCrop.

  Up to 10 tries of area fraction ``~U(scale)`` and aspect ratio (w/h)
  log-uniform in ``ratio``; if none fits, the largest centred crop whose aspect
  ratio is clamped to ``ratio``.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < ratio[0]:
    w, h = width, int(round(width / ratio[0]))
  elif in_ratio > ratio[1]:
    h, w = height, int(round(height * ratio[1]))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def random_resized_crop(image: np.ndarray, rng: np.random.Generator, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """Random crop (see :func:`random_resized_crop_box`) resized to ``size^2``.

  Args:
    image: uint8 ``(H, W, 3)`` of any size.

  Returns:
    uint8 ``(size, size, 3)``.
  """
  top, left, h, w = random_resized_crop_box(image.shape[0], image.shape[1],
                                            rng, scale, ratio)
  # Resizing only the box avoids copying the crop first.
  return _resize(image, size, size, box=(left, top, left + w, top + h))


def color_jitter(image: np.ndarray, rng: np.random.Generator,
                 brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.4) -> np.ndarray:
  """torchvision-style ``ColorJitter(brightness, contrast, saturation)``.

  Draws the order of the three operations (a permutation) then one factor
  ``~U(max(0, 1 - s), 1 + s)`` per operation, applies them in float32 with
  clipping to [0, 255] after each, like PIL's ImageEnhance:

  * brightness: ``x * f``;
  * contrast: blend with the mean grey level: ``m + f (x - m)``;
  * saturation: blend with the per-pixel grey image: ``g + f (x - g)``.

  Args:
    image: uint8 ``(H, W, 3)``.

  Returns:
    uint8 ``(H, W, 3)``, rounded to nearest.
  """
  order = rng.permutation(3)
  strengths = (brightness, contrast, saturation)
  factors = [rng.uniform(max(0.0, 1.0 - s), 1.0 + s) for s in strengths]
  x = image.astype(np.float32)
  for op in order:
    f = np.float32(factors[op])
    if op == 0:
      x = x * f
    elif op == 1:
      mean = np.float32((x @ _LUMA).mean())
      x = mean + f * (x - mean)
    else:
      grey = (x @ _LUMA)[..., None]
      x = grey + f * (x - grey)
    x = np.clip(x, 0.0, 255.0)
  return np.rint(x).astype(np.uint8)


def imagenet_augment(image: np.ndarray, rng: np.random.Generator,
                     size: int) -> np.ndarray:
  """RandomResizedCrop + horizontal flip + ColorJitter(0.4, 0.4, 0.4).

  Args:
    image: uint8 ``(H, W, 3)`` of any size.

  Returns:
    uint8 ``(size, size, 3)``.
  """
  image = random_flip(random_resized_crop(image, rng, size), rng)
  return color_jitter(image, rng)


def resize_center_crop(image: np.ndarray, size: int,
                       crop_fraction: float = 0.875) -> np.ndarray:
  """Eval transform: shorter side to ``round(size / crop_fraction)`` (256 for
  224), then the central ``size x size`` crop.

  Args:
    image: uint8 ``(H, W, 3)`` of any size.

  Returns:
    uint8 ``(size, size, 3)``.
  """
  h, w = image.shape[:2]
  short = int(round(size / crop_fraction))
  if h <= w:
    new_h, new_w = short, max(size, int(short * w / h))
  else:
    new_h, new_w = max(size, int(short * h / w)), short
  if (new_h, new_w) != (h, w):
    image = _resize(image, new_w, new_h)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return image[top:top + size, left:left + size]


def normalize(images: np.ndarray, mean: Sequence[float],
              std: Sequence[float]) -> np.ndarray:
  """uint8 NHWC (or HWC) in [0, 255] -> float32 ``(x / 255 - mean) / std``.

  ``mean`` and ``std`` are per-channel (RGB) in [0, 1] units.
  """
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (images.astype(np.float32) / np.float32(255.0) - mean) / std


def _identity(image: np.ndarray, rng: np.random.Generator | None = None
              ) -> np.ndarray:
  del rng
  return image


def _check_augment(augment: str) -> None:
  if augment not in AUGMENTS:
    raise ValueError(f"Unknown ds_cfg.augment={augment!r}. Set it to one of "
                     f"{list(AUGMENTS)}.")


def train_transform(augment: str, size: int) -> TrainTransform:
  """``f(image uint8 HWC, rng) -> uint8 (size, size, 3)`` for ``augment``.

  For ``"none"`` the image is returned as is (it must already be ``size^2``).
  The result is picklable (a ``functools.partial`` of module functions).
  """
  _check_augment(augment)
  if augment == "cifar":
    return functools.partial(cifar_augment, size=size, pad=4)
  if augment == "shift":
    return functools.partial(shift_augment, size=size, pad=1)
  if augment == "imagenet":
    return functools.partial(imagenet_augment, size=size)
  return _identity


def eval_transform(augment: str, size: int) -> EvalTransform:
  """Deterministic ``f(image uint8 HWC) -> uint8 (size, size, 3)``.

  Only ``"imagenet"`` resizes/crops; the other recipes evaluate the stored
  image unchanged (its side must equal ``size``).
  """
  _check_augment(augment)
  if augment == "imagenet":
    return functools.partial(resize_center_crop, size=size)
  return _identity
