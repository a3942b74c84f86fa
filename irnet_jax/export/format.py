"""One-file container for a :class:`~irnet_jax.export.PackedModel`.

Layout (all integers little-endian)::

  offset  size  field
  0       8     magic b"IRNETPKD"
  8       4     format version (uint32), currently FORMAT_VERSION
  12      4     reserved, 0
  16      8     payload length in bytes (uint64)
  24      32    sha256 of the payload
  56      ...   payload: an uncompressed .npz (numpy zip) holding every array of
                ``PackedModel.arrays`` under its key, plus ``__program__`` and
                ``__meta__``: UTF-8 JSON as uint8 arrays (no pickle anywhere).

:func:`load` checks, in this order, magic, version, length (truncation or
trailing bytes), checksum, then that the program's arrays are present with the
expected shapes and dtypes, and raises ``ValueError`` naming the first problem.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import zipfile

import numpy as np

from irnet_jax.export.pack import INPUT, OPS, PackedModel, expected_arrays

MAGIC = b"IRNETPKD"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ32s")  # magic, version, reserved, length, sha256
_PROGRAM, _META = "__program__", "__meta__"


def _json_array(obj) -> np.ndarray:
  return np.frombuffer(json.dumps(obj, sort_keys=True).encode(), np.uint8)


def to_bytes(packed: PackedModel) -> bytes:
  """The file contents :func:`save` writes."""
  buf = io.BytesIO()
  doc = {"program": packed.program, "output": packed.output}
  np.savez(buf, **packed.arrays, **{_PROGRAM: _json_array(doc),
                                    _META: _json_array(packed.meta)})
  payload = buf.getvalue()
  header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload),
                        hashlib.sha256(payload).digest())
  return header + payload


def save(packed: PackedModel, path: str | os.PathLike) -> int:
  """Writes ``packed`` to ``path`` (atomically, via a temporary file); returns its size."""
  data = to_bytes(packed)
  tmp = f"{os.fspath(path)}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)
  return len(data)


def from_bytes(data: bytes, source: str = "<bytes>") -> PackedModel:
  """Parses and validates file contents; ``ValueError`` on any problem."""
  if len(data) < _HEADER.size:
    raise ValueError(f"{source}: truncated file: {len(data)} bytes, the header alone is "
                     f"{_HEADER.size}")
  magic, version, _, length, digest = _HEADER.unpack_from(data)
  if magic != MAGIC:
    raise ValueError(f"{source}: not an irnet_jax packed model (bad magic {magic!r})")
  if version > FORMAT_VERSION:
    raise ValueError(f"{source}: format version {version} is newer than the newest this "
                     f"irnet_jax reads ({FORMAT_VERSION}); upgrade irnet_jax")
  if version < 1:
    raise ValueError(f"{source}: invalid format version {version}")
  payload = data[_HEADER.size:]
  if len(payload) < length:
    raise ValueError(f"{source}: truncated file: payload has {len(payload)} of {length} "
                     "bytes")
  if len(payload) > length:
    raise ValueError(f"{source}: {len(payload) - length} unexpected trailing bytes after "
                     "the payload")
  if hashlib.sha256(payload).digest() != digest:
    raise ValueError(f"{source}: checksum mismatch (sha256 of the payload): the file is "
                     "corrupt")
  try:
    with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
      arrays = {k: npz[k] for k in npz.files}
    doc = json.loads(arrays.pop(_PROGRAM).tobytes().decode())
    meta = json.loads(arrays.pop(_META).tobytes().decode())
    packed = PackedModel(program=doc["program"], output=doc["output"], arrays=arrays,
                         meta=meta)
  except (KeyError, TypeError, ValueError, OSError, zipfile.BadZipFile) as e:
    raise ValueError(f"{source}: malformed payload: {e}") from e
  validate(packed, source)
  return packed


def load(path: str | os.PathLike) -> PackedModel:
  """Reads a file written by :func:`save`; ``ValueError`` names what is wrong."""
  with open(path, "rb") as f:
    return from_bytes(f.read(), os.fspath(path))


def validate(packed: PackedModel, source: str = "<packed>") -> None:
  """Checks that every instruction is known and finds its arrays with the right
  shapes/dtypes, and that registers are defined before use."""
  defined = {INPUT}
  for n, ins in enumerate(packed.program):
    if ins.get("op") not in OPS:
      raise ValueError(f"{source}: instruction {n} has unknown op {ins.get('op')!r}")
    missing = [r for r in ins.get("inputs", []) if r not in defined]
    if missing:
      raise ValueError(f"{source}: instruction {n} ({ins['op']}) reads undefined "
                       f"registers {missing}")
    for key, (shape, dtype) in expected_arrays(ins).items():
      arr = packed.arrays.get(key)
      if arr is None:
        raise ValueError(f"{source}: array {key!r} is missing")
      if arr.dtype != np.dtype(dtype) or (shape is not None and arr.shape != shape):
        raise ValueError(f"{source}: array {key!r} is {arr.dtype}{list(arr.shape)}, "
                         f"expected {dtype}{list(shape) if shape else ''}")
    defined.add(ins["out"])
  if packed.output not in defined:
    raise ValueError(f"{source}: output register {packed.output!r} is never written")
