"""irnet_jax.data.decode: image bytes -> RGB arrays as torchvision's pil_loader, only
the formats of PIL_FORMATS (a PostScript file named .jpg never reaches Ghostscript), and
bad files named with the fix."""
import io
import pickle
import subprocess

import numpy as np
import pytest
from PIL import Image

from irnet_jax.data import decode, decode_crop


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


def _gradient(h=24, w=40) -> np.ndarray:
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 255 // (w - 1), y * 255 // (h - 1),
                   (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


def test_decode_modes_match_pil_convert_rgb():
  rgb = Image.fromarray(_gradient())
  cases = {
      "rgb_png": _encode(rgb, "PNG"),
      "rgba_png": _encode(rgb.convert("RGBA"), "PNG"),
      "palette_png": _encode(rgb.convert("P"), "PNG"),
      "grey_jpeg": _encode(rgb.convert("L"), "JPEG", quality=95),
      "cmyk_jpeg": _encode(rgb.convert("CMYK"), "JPEG", quality=95),
      "rgb_jpeg": _encode(rgb, "JPEG", quality=95),
  }
  for name, data in cases.items():
    out = decode.decode_image(data, name)
    assert out.dtype == np.uint8 and out.shape == (24, 40, 3), name
    assert out.flags.writeable
    # The torchvision pil_loader reference: open + convert("RGB").
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(out, expected, err_msg=name)
  # Lossless formats keep the pixels; grey is replicated; CMYK stays close.
  np.testing.assert_array_equal(decode.decode_image(cases["rgb_png"]),
                                _gradient())
  grey = decode.decode_image(cases["grey_jpeg"])
  assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
  cmyk = decode.decode_image(cases["cmyk_jpeg"]).astype(int)
  assert np.abs(cmyk - _gradient()).mean() < 4


def test_decode_draft_reduces_jpeg_only():
  big = Image.fromarray(np.repeat(np.repeat(_gradient(), 8, 0), 8, 1))  # 192x320
  jpeg = _encode(big, "JPEG", quality=90)
  assert decode.decode_image(jpeg).shape == (192, 320, 3)
  # Largest 1/2^k scale with both sides >= the request: 1/4 -> 48x80.
  assert decode.decode_image(jpeg, draft_to=(70, 40)).shape == (48, 80, 3)
  assert decode.decode_image(jpeg, draft_to=(320, 192)).shape == (192, 320, 3)
  png = _encode(big, "PNG")
  assert decode.decode_image(png, draft_to=(70, 40)).shape == (192, 320, 3)


@pytest.mark.parametrize("kind", ["empty", "garbage", "truncated"])
def test_decode_bad_bytes_names_file_and_fix(tmp_path, kind):
  jpeg = _encode(Image.fromarray(_gradient(64, 64)), "JPEG")
  data = {"empty": b"", "garbage": b"not an image at all",
          "truncated": jpeg[:len(jpeg) // 2]}[kind]
  path = tmp_path / "bad.JPEG"
  path.write_bytes(data)
  with pytest.raises(decode.BadImageError, match="skip_bad_files=True") as e:
    decode.load_image(path)
  assert e.value.path == str(path) and str(path) in str(e.value)
  # Survives the trip back from a worker process.
  again = pickle.loads(pickle.dumps(e.value))
  assert isinstance(again, decode.BadImageError) and again.path == str(path)
  assert str(again) == str(e.value)


def test_unreadable_file_is_a_bad_image(tmp_path):
  with pytest.raises(decode.BadImageError, match="missing.jpg"):
    decode.load_image(tmp_path / "missing.jpg")


def _postscript(path):
  """A minimal EPS file: PIL's EpsImagePlugin would hand it to Ghostscript."""
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 16 16\n"
                   b"0 0 moveto 16 16 lineto stroke\nshowpage\n%%EOF\n")
  return path


def _ghostscript_fails(monkeypatch) -> list:
  """Ghostscript as on a host that has it and fails on the file (the error
  that escaped skip_bad_files); returns the calls made to it."""
  from PIL import EpsImagePlugin  # pylint: disable=import-outside-toplevel
  calls = []

  def ghostscript(*args, **kwargs):
    calls.append(args)
    raise subprocess.CalledProcessError(1, ["gs"])
  monkeypatch.setattr(EpsImagePlugin, "Ghostscript", ghostscript)
  return calls


def test_postscript_named_jpg_is_a_bad_image(tmp_path, monkeypatch):
  calls = _ghostscript_fails(monkeypatch)
  path = _postscript(tmp_path / "x.jpg")
  with pytest.raises(decode.BadImageError, match="supported format") as e:
    decode.load_image(path)
  assert str(path) in str(e.value) and "skip_bad_files=True" in str(e.value)
  rng = np.random.default_rng(0)
  with pytest.raises(decode.BadImageError, match="x.jpg.*supported format"):
    decode_crop.random_resized_crop(path.read_bytes(), str(path), rng, 8)
  with pytest.raises(decode.BadImageError, match="x.jpg.*supported format"):
    decode_crop.resize_center_crop(path.read_bytes(), str(path), 8)
  assert not calls  # PIL never got as far as running Ghostscript.
  # What ImageNet holds still decodes: a PNG named .JPEG, CMYK and grey JPEGs.
  image = _gradient(16, 16)
  png = tmp_path / "png.JPEG"
  png.write_bytes(_encode(Image.fromarray(image), "PNG"))
  np.testing.assert_array_equal(decode.load_image(png), image)
  for mode in ("CMYK", "L"):
    encoded = _encode(Image.fromarray(image).convert(mode), "JPEG")
    assert decode.decode_image(encoded).shape == (16, 16, 3)
    assert decode_crop.resize_center_crop(encoded, "f", 8).shape == (8, 8, 3)
