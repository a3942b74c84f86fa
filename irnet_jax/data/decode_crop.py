"""Crop-aware decoding: encoded image file -> the augmented uint8 crop.

The "imagenet" recipe only needs a 224x224 crop of each file, so the crop is
chosen from the header's size before decoding and the PIL image is cropped
and resized directly (no full-size RGB array copies), optionally decoding
JPEGs at a reduced DCT scale (PIL's ``Image.draft``) when the crop leaves room
for it. Results are those of :mod:`irnet_jax.data.augment` on the fully
decoded image (exactly, without draft; see :func:`draft_scale` with it).
Decoding follows :mod:`irnet_jax.data.decode` (torchvision's ``pil_loader``:
greyscale, CMYK, palette images converted to RGB; only the formats of
:data:`decode.PIL_FORMATS`); undecodable data raises
:class:`decode.BadImageError` naming the file.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Iterator

import numpy as np
from PIL import Image

from irnet_jax.data import augment, decode

# What PIL raises for bad data (as irnet_jax.data.decode).
_PIL_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
               Image.DecompressionBombWarning)
_DRAFT_SCALES = (1, 2, 4, 8)


@contextlib.contextmanager
def _bad_image_errors(path: str) -> Iterator[None]:
  """Turns PIL's errors (and decompression-bomb warnings) into BadImageError."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      yield
  except _PIL_ERRORS as e:
    raise decode.BadImageError(path, decode.pil_error_reason(e)) from e


def _open(data: bytes, path: str) -> Image.Image:
  """Parses the header only (size, format); decoding happens in _rgb. Only
  the formats of :data:`decode.PIL_FORMATS` (no PostScript through
  Ghostscript)."""
  with _bad_image_errors(path):
    return decode.open_image(data)


def _rgb(img: Image.Image, path: str) -> Image.Image:
  """Decodes ``img``; RGB as torchvision's ``pil_loader`` (no copy if RGB)."""
  with _bad_image_errors(path):
    img.load()  # Truncated or corrupt data fails here.
    return img if img.mode == "RGB" else img.convert("RGB")


def draft_scale(box: tuple[int, int, int, int], size: int) -> int:
  """Largest JPEG DCT reduction (1, 2, 4 or 8) that keeps the crop ``box =
  (top, left, h, w)`` at least ``size`` pixels on both sides: the crop is then
  still only shrunk (never enlarged) to ``size^2``."""
  shorter = min(box[2], box[3])
  for scale in (8, 4, 2):
    if shorter >= scale * size:
      return scale
  return 1


def random_resized_crop(data: bytes, path: str, rng: Any, size: int,
                        draft: bool = False) -> np.ndarray:
  """torchvision's ``RandomResizedCrop(size)`` of an encoded image.

  The box is drawn in full-resolution pixels from the header's size, with
  the draws of :func:`augment.random_resized_crop` on the decoded image.
  Without ``draft`` the result equals that function's exactly. With it,
  JPEGs are decoded at the :func:`draft_scale` reduction and the box is
  mapped onto the smaller image.

  Returns:
    uint8 ``(size, size, 3)``.
  """
  img = _open(data, path)
  width, height = img.size
  top, left, h, w = box = augment.random_resized_crop_box(height, width, rng)
  scale = draft_scale(box, size) if draft else 1
  if scale > 1 and img.format == "JPEG":
    with _bad_image_errors(path):
      img.draft(img.mode, (width // scale, height // scale))
  img = _rgb(img, path)
  # libjpeg picked the reduction (ceil(side / scale) pixels); read it back.
  actual = min(_DRAFT_SCALES, key=lambda s: abs(s - width / img.size[0]))
  if actual == 1:  # Crop, then resize: as torchvision's F.resized_crop.
    out = img.crop((left, top, left + w, top + h)).resize(
        (size, size), Image.Resampling.BILINEAR)
  else:
    out = img.resize((size, size), Image.Resampling.BILINEAR,
                     box=(left / actual, top / actual, (left + w) / actual,
                          (top + h) / actual))
  return np.asarray(out)


def resize_center_crop(data: bytes, path: str, size: int) -> np.ndarray:
  """:func:`augment.resize_center_crop` of an encoded image (full decode).

  Returns:
    uint8 ``(size, size, 3)``.
  """
  img = _rgb(_open(data, path), path)
  width, height = img.size
  new_h, new_w = augment.eval_resize_shape(height, width, size)
  if (new_h, new_w) != (height, width):
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
  top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
  return np.asarray(img.crop((left, top, left + size, top + size)))
