"""Image file decoding: encoded bytes -> uint8 ``(H, W, 3)`` RGB numpy arrays.

Decoding follows torchvision's ``pil_loader`` (``Image.open(f).convert("RGB")``),
so greyscale, CMYK (ImageNet has a few of each), palette and RGBA images come
out as RGB exactly as the official PyTorch pipeline sees them. Only the formats
of :data:`PIL_FORMATS` are decoded, whatever the file is named: PIL knows ~40
formats, and some run external programs (a PostScript file named ``.jpg`` makes
PIL call Ghostscript). Anything else, and anything that cannot be decoded,
raises :class:`BadImageError`, which names the file and the fix; the pipeline
turns it into a deterministic replacement when ``dataset.skip_bad_files=True``.
"""
from __future__ import annotations

import functools
import io
import os
import warnings

import numpy as np
from PIL import Image

SKIP_BAD_FILES_FIX = ("Replace or delete the file, or pass "
                      "--config.dataset.skip_bad_files=True to replace "
                      "undecodable images deterministically (they are counted "
                      "in the logs).")


# The formats of torchvision's IMG_EXTENSIONS (folders.IMG_EXTENSIONS): JPEG and
# PNG hold ImageNet, with its few CMYK and greyscale JPEGs and the PNG named
# .JPEG (formats are told by content, not by name); PPM also reads .pgm.
# MPO (multi-picture JPEG from cameras) comes in through the JPEG opener.
PIL_FORMATS = ("JPEG", "PNG", "BMP", "PPM", "TIFF", "WEBP")


@functools.cache
def pil_formats() -> tuple[str, ...]:
  """:data:`PIL_FORMATS` that this PIL build can open (``Image.open`` fails
  with a KeyError on a format it lacks, e.g. WEBP without libwebp)."""
  Image.init()
  return tuple(f for f in PIL_FORMATS if f in Image.OPEN)


def open_image(data: bytes) -> Image.Image:
  """``Image.open`` limited to :func:`pil_formats` (header only, lazy decode).

  Raises:
    PIL.UnidentifiedImageError: another format or not an image.
  """
  return Image.open(io.BytesIO(data), formats=pil_formats())


def pil_error_reason(error: BaseException) -> str:
  """What went wrong, for :class:`BadImageError`, from one of PIL's errors."""
  if isinstance(error, Image.UnidentifiedImageError):
    return (f"not an image in a supported format ({'/'.join(pil_formats())}):"
            f" another format (e.g. PostScript, GIF), an empty file or a "
            f"truncated header")
  return f"{type(error).__name__}: {error}"


class BadImageError(ValueError):
  """An image file that cannot be read or decoded.

  Attributes:
    path: the file (as given to the reader).
    reason: what went wrong (the decoder's message).
  """

  def __init__(self, path: str, reason: str):
    self.path = str(path)
    self.reason = str(reason)
    super().__init__(f"Cannot decode image {self.path!r}: {self.reason}. "
                     + SKIP_BAD_FILES_FIX)

  def __reduce__(self):
    # Worker processes send exceptions back pickled; the default reduce would
    # call __init__ with the formatted message only.
    return (BadImageError, (self.path, self.reason))


def read_file(path: str) -> bytes:
  """The bytes of ``path``; an unreadable file raises :class:`BadImageError`."""
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError as e:
    raise BadImageError(path, f"{type(e).__name__}: {e.strerror or e}") from e


def decode_image(data: bytes, path: str = "<bytes>",
                 draft_to: tuple[int, int] | None = None) -> np.ndarray:
  """Decodes an encoded image (:data:`PIL_FORMATS`) to uint8 ``(H, W, 3)`` RGB.

  Args:
    data: the encoded file contents.
    path: names the file in errors only.
    draft_to: ``(width, height)`` in pixels, or ``None`` for a full decode. For
      JPEGs, lets libjpeg decode at a reduced DCT scale (1/2, 1/4 or 1/8) as
      long as both sides stay ``>=`` these (PIL's ``Image.draft``); the result
      is then smaller than the stored image. Ignored for other formats.

  Returns:
    uint8 ``(H, W, 3)`` array (a fresh, writable copy).

  Raises:
    BadImageError: the bytes are not a decodable image (truncated, corrupt,
      a format outside :data:`PIL_FORMATS`, empty file, decompression bomb).
  """
  try:
    with warnings.catch_warnings():
      # A decompression-bomb warning is an error here: it names the file.
      warnings.simplefilter("error", Image.DecompressionBombWarning)
      with open_image(data) as img:
        if draft_to is not None and img.format == "JPEG":
          # draft keeps the colour space; convert() below does CMYK/L -> RGB.
          img.draft(img.mode, tuple(int(s) for s in draft_to))
        rgb = img.convert("RGB")  # Forces the full decode (truncation errors).
      return np.array(rgb, dtype=np.uint8)  # One writable copy.
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
          Image.DecompressionBombWarning) as e:
    # PIL signals bad data with all of these (UnidentifiedImageError and
    # "image file is truncated" are OSErrors).
    raise BadImageError(path, pil_error_reason(e)) from e


def image_size(path: str | os.PathLike) -> tuple[int, int]:
  """``(height, width)`` of an image file from its header (no pixel decoding).

  Raises:
    BadImageError: unreadable, or not an image of :data:`PIL_FORMATS`.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f, Image.open(f, formats=pil_formats()) as img:
      width, height = img.size
  except OSError as e:
    if isinstance(e, Image.UnidentifiedImageError):
      raise BadImageError(path, pil_error_reason(e)) from e
    raise BadImageError(path, f"{type(e).__name__}: {e.strerror or e}") from e
  except (ValueError, SyntaxError) as e:
    raise BadImageError(path, pil_error_reason(e)) from e
  return int(height), int(width)


def load_image(path: str | os.PathLike,
               draft_to: tuple[int, int] | None = None) -> np.ndarray:
  """:func:`read_file` then :func:`decode_image`; uint8 ``(H, W, 3)`` RGB."""
  path = os.fspath(path)
  return decode_image(read_file(path), path, draft_to)
