"""irnet_jax.data.decode_crop: decoding straight to the augmented crop gives the crop of
the decoded image (exactly without draft, close with reduced-DCT decoding)."""
import io

import numpy as np
import pytest
from PIL import Image

from irnet_jax.data import augment as aug
from irnet_jax.data import decode, decode_crop


def _smooth_jpeg(width, height, seed=0):
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
  data_ = _smooth_jpeg(640, 480)
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
