"""Pure numpy image augmentations (torchvision semantics) and normalization.

Images are single HWC uint8 arrays in [0, 255] (one NHWC example); batches are
NHWC. Every random function takes an explicit ``np.random.Generator`` and draws
from nothing else, so the output is a deterministic function of
``(image, rng state)``; inputs are never modified. Resizing uses Pillow's
bilinear filter (antialiased when shrinking), as torchvision on PIL images.

Recipes (``ds_cfg.augment``), the torchvision pipelines of the official IR-Net
code:

* ``"cifar"``: zero-pad 4, random ``size x size`` crop, random horizontal flip
  (``RandomCrop(32, padding=4) + RandomHorizontalFlip``).
* ``"imagenet"``: ``RandomResizedCrop(size)`` (scale 0.08-1, ratio 3/4-4/3),
  ``RandomHorizontalFlip``, ``ColorJitter(0.2, 0.2, 0.2, 0.1)``; eval
  ``Resize(256) + CenterCrop(224)`` (for size 224). The colour jitter can run
  here (host) or on the device inside the jitted step
  (``irnet_jax.data.device``); its formulas are written once for both.
* ``"shift"``: zero-pad 1 and random crop (small translations, no flip: digits
  are not mirror-symmetric).
* ``"none"``: identity.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

AUGMENTS = ("cifar", "imagenet", "shift", "none")

# The official ImageNet recipe's ColorJitter(brightness, contrast, saturation,
# hue).
COLOR_JITTER = (0.2, 0.2, 0.2, 0.1)

# Anything with np.random.Generator's uniform(lo, hi), integers(lo, hi) and
# permutation(n) (tests replay torchvision's recorded draws through it).
Draws = Any

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


def random_resized_crop_box(
    height: int, width: int, rng: Draws,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
  """Samples a crop ``(top, left, h, w)`` exactly as torchvision's
  ``RandomResizedCrop.get_params``.

  Up to 10 tries of area fraction ``~U(scale)`` and aspect ratio (w/h)
  log-uniform in ``ratio``, sides rounded with Python's ``round``; the first
  that fits is placed uniformly (``integers(0, H - h + 1)`` then
  ``integers(0, W - w + 1)``). If none fits: the whole image with its aspect
  ratio clamped to ``ratio``, centred.

  Args:
    height, width: the full image, in pixels.
    rng: draws ``uniform(lo, hi)`` and ``integers(lo, hi)`` (an
      ``np.random.Generator``), in torchvision's order: per try, area then
      log-ratio; then top, left.
  """
  area = height * width
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * float(rng.uniform(scale[0], scale[1]))
    aspect = math.exp(float(rng.uniform(log_lo, log_hi)))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return top, left, h, w
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    h, w = height, int(round(height * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: np.ndarray, box: tuple[int, int, int, int],
                 size: int) -> np.ndarray:
  """Crops ``box = (top, left, h, w)`` then resizes it to ``size^2``, bilinear
  (antialiased when shrinking), as torchvision's ``F.resized_crop`` on a PIL
  image: pixels outside the box never enter the result.

  Args:
    image: uint8 ``(H, W, 3)``.

  Returns:
    uint8 ``(size, size, 3)``.
  """
  top, left, h, w = box
  crop = Image.fromarray(np.ascontiguousarray(image[top:top + h,
                                                    left:left + w]))
  return np.asarray(crop.resize((size, size), Image.Resampling.BILINEAR))


def random_resized_crop(image: np.ndarray, rng: Draws, size: int,
                        scale: Sequence[float] = (0.08, 1.0),
                        ratio: Sequence[float] = (3 / 4, 4 / 3)) -> np.ndarray:
  """torchvision's ``RandomResizedCrop(size, scale, ratio)`` on uint8
  ``(H, W, 3)``: :func:`random_resized_crop_box` then :func:`resized_crop`."""
  box = random_resized_crop_box(image.shape[0], image.shape[1], rng, scale,
                                ratio)
  return resized_crop(image, box, size)


# ----------------------------------------------------------------------------
# colour jitter: torchvision's tensor formulas, written once for numpy (host)
# and jax.numpy (device, irnet_jax.data.device): pass the array module as xp.


def color_jitter_params(rng: Draws, strengths: Sequence[float] = COLOR_JITTER
                        ) -> tuple[np.ndarray, np.ndarray]:
  """Draws ``ColorJitter(*strengths)``'s parameters as torchvision does.

  First the order (a permutation of 0..3 = brightness, contrast, saturation,
  hue), then one factor per operation: ``U(max(0, 1 - s), 1 + s)`` for the
  first three and ``U(-s, s)`` for hue.

  Returns:
    ``(order int (4,), factors float64 (4,))``.
  """
  order = rng.permutation(4)
  b, c, s, h = strengths
  factors = np.array([rng.uniform(max(0.0, 1 - b), 1 + b),
                      rng.uniform(max(0.0, 1 - c), 1 + c),
                      rng.uniform(max(0.0, 1 - s), 1 + s),
                      rng.uniform(-h, h)])
  return order, factors


def _grey(x, xp):
  """torchvision's ``rgb_to_grayscale`` weights; ``(..., 3) -> (..., 1)``."""
  return (0.2989 * x[..., 0:1] + 0.587 * x[..., 1:2] + 0.114 * x[..., 2:3])


def _blend(x, other, f, xp):
  return xp.clip(f * x + (1.0 - f) * other, 0.0, 1.0)


def adjust_brightness(x, f, xp=np):
  """``x * f`` clipped; ``x`` float ``(H, W, 3)`` in [0, 1]."""
  return _blend(x, 0.0, f, xp)


def adjust_contrast(x, f, xp=np):
  """Blend with the image's mean grey level (one scalar per image)."""
  return _blend(x, xp.mean(_grey(x, xp), axis=(-3, -2, -1), keepdims=True), f,
                xp)


def adjust_saturation(x, f, xp=np):
  """Blend with the per-pixel grey image."""
  return _blend(x, _grey(x, xp), f, xp)


def adjust_hue(x, f, xp=np):
  """Rotates the hue by ``f`` turns (``f`` in [-0.5, 0.5]) in HSV space, with
  torchvision's ``_rgb2hsv`` / ``_hsv2rgb`` (grey pixels keep hue 0)."""
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  # torchvision picks the hue formula by maxc == r, then maxc == g; the same
  # choice from comparisons between the channels themselves, so that a
  # compiler recomputing maxc cannot make every test fail at once.
  r_max = (r >= g) & (r >= b)
  g_max = ~r_max & (g >= b)
  maxc = xp.where(r_max, r, xp.where(g_max, g, b))
  minc = xp.minimum(xp.minimum(r, g), b)
  cr = maxc - minc
  eqc = cr == 0
  s = cr / xp.where(eqc, 1.0, maxc)
  cr_div = xp.where(eqc, 1.0, cr)
  rc, gc, bc = (maxc - r) / cr_div, (maxc - g) / cr_div, (maxc - b) / cr_div
  h = xp.where(r_max, bc - gc, xp.where(g_max, 2.0 + rc - bc, 4.0 + gc - rc))
  # torchvision's fmod(., 1) and % 1 as a - floor(a) (exact; no libm call).
  h = h / 6.0 + 1.0
  h = h - xp.floor(h)
  h = h + f
  h = h - xp.floor(h)
  v = maxc
  i6 = xp.floor(h * 6.0)
  fr = h * 6.0 - i6
  i6 = xp.where(i6 >= 6.0, i6 - 6.0, i6)  # h rounded up to 1.0: sector 0.
  p = xp.clip(v * (1.0 - s), 0.0, 1.0)
  q = xp.clip(v * (1.0 - s * fr), 0.0, 1.0)
  t = xp.clip(v * (1.0 - s * (1.0 - fr)), 0.0, 1.0)

  def pick(*choices):  # choices[k] where i6 == k.
    out = choices[5]
    for k in range(4, -1, -1):
      out = xp.where(i6 == k, choices[k], out)
    return out

  return xp.stack([pick(v, q, p, p, t, v), pick(t, v, v, q, p, p),
                   pick(p, p, t, v, v, q)], axis=-1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation,
              adjust_hue)


def apply_color_jitter(x, order, factors, xp=np):
  """Applies the four ``JITTER_OPS`` to float ``(H, W, 3)`` in [0, 1] in the
  given ``order`` with ``factors`` (from :func:`color_jitter_params`); what
  torchvision's ``ColorJitter.forward`` does after drawing them."""
  for op in order:
    x = JITTER_OPS[int(op)](x, factors[int(op)], xp)
  return x


def color_jitter(image: np.ndarray, rng: Draws,
                 strengths: Sequence[float] = COLOR_JITTER) -> np.ndarray:
  """torchvision's ``ColorJitter(*strengths)`` on uint8 ``(H, W, 3)``.

  Computed in float32 with torchvision's tensor formulas (one rounding at
  the end; torchvision on PIL images rounds to uint8 after each operation).
  """
  order, factors = color_jitter_params(rng, strengths)
  x = image.astype(np.float32) / np.float32(255.0)
  x = apply_color_jitter(x, order, factors.astype(np.float32))
  return np.rint(x * np.float32(255.0)).astype(np.uint8)


def imagenet_augment(image: np.ndarray, rng: Draws, size: int,
                     jitter: bool = True) -> np.ndarray:
  """RandomResizedCrop(size) + RandomHorizontalFlip + (optionally)
  ColorJitter(0.2, 0.2, 0.2, 0.1), the official IR-Net ImageNet recipe.

  Args:
    image: uint8 ``(H, W, 3)`` of any size.
    jitter: False when the colour jitter runs on the device instead
      (``irnet_jax.data.device``).

  Returns:
    uint8 ``(size, size, 3)``.
  """
  image = random_flip(random_resized_crop(image, rng, size), rng)
  return color_jitter(image, rng) if jitter else image


def eval_resize_shape(height: int, width: int, size: int,
                      crop_fraction: float = 0.875) -> tuple[int, int]:
  """``(new_h, new_w)`` of torchvision's ``Resize(round(size / crop_fraction))``:
  the shorter side to that, the longer to ``int(short * longer / shorter)``."""
  short = int(round(size / crop_fraction))
  if height <= width:
    return short, int(short * width / height)
  return int(short * height / width), short


def resize_center_crop(image: np.ndarray, size: int,
                       crop_fraction: float = 0.875) -> np.ndarray:
  """Eval transform as torchvision's ``Resize(short) + CenterCrop(size)`` on
  PIL images, ``short = round(size / crop_fraction)`` (256 for 224): shorter
  side to ``short``, longer to ``int(short * long / shorter)`` (bilinear,
  antialiased), then the central ``size x size``.

  Args:
    image: uint8 ``(H, W, 3)`` of any size.

  Returns:
    uint8 ``(size, size, 3)``.
  """
  h, w = image.shape[:2]
  new_h, new_w = eval_resize_shape(h, w, size, crop_fraction)
  if (new_h, new_w) != (h, w):
    pil = Image.fromarray(np.ascontiguousarray(image))
    image = np.asarray(pil.resize((new_w, new_h), Image.Resampling.BILINEAR))
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
    raise ValueError(f"Unknown --config.dataset.augment={augment!r}. Set it to one of "
                     f"{list(AUGMENTS)}.")


def train_transform(augment: str, size: int,
                    jitter: bool = True) -> TrainTransform:
  """``f(image uint8 HWC, rng) -> uint8 (size, size, 3)`` for ``augment``.

  For ``"none"`` the image is returned as is (it must already be ``size^2``).
  ``jitter=False`` leaves the colour jitter of ``"imagenet"`` to the device.
  The result is picklable (a ``functools.partial`` of module functions).
  """
  _check_augment(augment)
  if augment == "cifar":
    return functools.partial(cifar_augment, size=size, pad=4)
  if augment == "shift":
    return functools.partial(shift_augment, size=size, pad=1)
  if augment == "imagenet":
    return functools.partial(imagenet_augment, size=size, jitter=jitter)
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
