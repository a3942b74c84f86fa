"""One-file container for a :class:`~irnet_jax.export.PackedModel`.

Layout (all integers little-endian)::

  offset  size  field
  0       8     magic b"IRNETPKD"
  8       4     format version (uint32), currently FORMAT_VERSION
  12      4     reserved, 0
  16      8     payload length in bytes (uint64)
  24      32    sha256 of the payload
  56      ...   payload

  payload:
  0       8     index length L (uint64)
  8       L     index: UTF-8 JSON {"program", "output", "meta", "arrays"}, where
                "arrays" lists {"name", "dtype", "shape", "offset"} per array
  ...           array data: raw little-endian C-order bytes, each array starting at
                its "offset" (relative to the payload start, 8-byte aligned)

Versions: 1, programs hand-written per model family (``conv``, ``bn``, ``act``, ``add``,
``max_pool``, ``avg_pool``, ``shortcut_a``, ``flatten_chw``, ``linear``); 2, programs
traced from the forward (:mod:`.trace`: ``dense``, ``nnx_*`` layers, generic lax
instructions and constants; binary layers may have a float ``scale``, a bias, RSign
and RPReLU). This version reads and runs both; an older irnet_jax refuses a version 2
file as "newer".

No pickle, no zip: the payload is the arrays' bytes plus a small index (a zip
entry per array, as in .npz, would cost ~0.3 KB each -- a third of a packed
ResNet-20). :func:`load` checks, in this order, magic, version, length
(truncation or trailing bytes), checksum, the index, then that the program's
arrays are present with the expected shapes and dtypes, then traces the program on
abstract inputs of the declared input shape (shapes, indices, strides, channel counts,
and a memory bound derived from the file), and raises :class:`PackedFormatError` (a
``ValueError``) naming the file and the first problem: a damaged or crafted file never
surfaces as another exception, in load or later in infer.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct

import numpy as np

from irnet_jax import workdir as workdir_lib
from irnet_jax.export.check import check_attributes, check_program
from irnet_jax.export.pack import INPUT, OPS, PackedModel, expected_arrays

MAGIC = b"IRNETPKD"
FORMAT_VERSION = 2
_HEADER = struct.Struct("<8sIIQ32s")  # magic, version, reserved, length, sha256


# Array dtypes a packed model uses; anything else in a file is rejected.
_DTYPES = ("float32", "uint32", "int8")
_ALIGN = 8


class PackedFormatError(ValueError):
  """A file that is not a valid packed model (damaged, truncated, crafted or newer)."""


def _aligned(n: int) -> int:
  return -(-n // _ALIGN) * _ALIGN


def to_bytes(packed: PackedModel) -> bytes:
  """The file contents :func:`save` writes."""
  arrays = {k: np.ascontiguousarray(v, v.dtype.newbyteorder("<"))
            for k, v in sorted(packed.arrays.items())}
  entries, offset = [], 0
  for name, a in arrays.items():
    if a.dtype.name not in _DTYPES:
      raise ValueError(f"array {name!r} has dtype {a.dtype}; expected one of {_DTYPES}")
    entries.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape),
                     "offset": offset})
    offset = _aligned(offset + a.nbytes)

  def index_bytes(base):  # offsets are relative to the payload start
    doc = {"program": packed.program, "output": packed.output, "meta": packed.meta,
           "arrays": [dict(e, offset=e["offset"] + base) for e in entries]}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

  # The index length depends on the offsets, which depend on the index length.
  base = _aligned(8 + len(index_bytes(0)))
  while _aligned(8 + len(index_bytes(base))) != base:
    base = _aligned(8 + len(index_bytes(base)))
  index = index_bytes(base)
  payload = bytearray(base + offset)
  payload[:8] = struct.pack("<Q", len(index))
  payload[8:8 + len(index)] = index
  for e, a in zip(entries, arrays.values()):
    start = base + e["offset"]
    payload[start:start + a.nbytes] = a.tobytes()
  payload = bytes(payload)
  header = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, len(payload),
                        hashlib.sha256(payload).digest())
  return header + payload


def save(packed: PackedModel, path: str | os.PathLike) -> int:
  """Writes ``packed`` to ``path`` (atomically: a temporary in the same directory,
  fsynced, renamed; a symlink at ``path`` is replaced); returns its size."""
  data = to_bytes(packed)
  workdir_lib.write_atomic(os.fspath(path), data)
  return len(data)


def from_bytes(data: bytes, source: str = "<bytes>") -> PackedModel:
  """Parses and validates file contents; ``ValueError`` on any problem."""
  if len(data) < _HEADER.size:
    raise PackedFormatError(f"{source}: truncated file: {len(data)} bytes, the header alone is "
                     f"{_HEADER.size}")
  magic, version, _, length, digest = _HEADER.unpack_from(data)
  if magic != MAGIC:
    raise PackedFormatError(f"{source}: not an irnet_jax packed model (bad magic {magic!r})")
  if version > FORMAT_VERSION:
    raise PackedFormatError(f"{source}: format version {version} is newer than the newest this "
                     f"irnet_jax reads ({FORMAT_VERSION}); upgrade irnet_jax")
  if version < 1:
    raise PackedFormatError(f"{source}: invalid format version {version}")
  payload = data[_HEADER.size:]
  if len(payload) < length:
    raise PackedFormatError(f"{source}: truncated file: payload has {len(payload)} of {length} "
                     "bytes")
  if len(payload) > length:
    raise PackedFormatError(f"{source}: {len(payload) - length} unexpected trailing bytes after "
                     "the payload")
  if hashlib.sha256(payload).digest() != digest:
    raise PackedFormatError(f"{source}: checksum mismatch (sha256 of the payload): the file is "
                     "corrupt")
  packed = _parse_payload(payload, source)
  validate(packed, source)
  return packed


def _parse_payload(payload: bytes, source: str) -> PackedModel:
  try:
    (n,) = struct.unpack_from("<Q", payload)
    doc = json.loads(payload[8:8 + n].decode())
    if not isinstance(doc, dict) or not isinstance(doc.get("arrays"), list):
      raise ValueError("the index is not an object with an 'arrays' list")
    arrays = {}
    for e in doc["arrays"]:
      if e["dtype"] not in _DTYPES:
        raise ValueError(f"array {e['name']!r} has unsupported dtype {e['dtype']!r}")
      dtype, shape, offset = np.dtype(e["dtype"]).newbyteorder("<"), e["shape"], e["offset"]
      if not isinstance(shape, list) or not all(
          isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"array {e['name']!r} has shape {shape!r}, not a list of sizes")
      if not isinstance(offset, int) or isinstance(offset, bool):
        raise ValueError(f"array {e['name']!r} has offset {offset!r}, not an integer")
      count = math.prod(shape)  # Python ints: a crafted shape cannot overflow.
      if offset < 8 + n or offset + count * dtype.itemsize > len(payload):
        raise ValueError(f"array {e['name']!r} lies outside the payload")
      arrays[e["name"]] = np.frombuffer(payload, dtype, count, offset).reshape(shape).astype(
          dtype.newbyteorder("="))
    return PackedModel(program=doc["program"], output=doc["output"], arrays=arrays,
                       meta=doc["meta"])
  except (KeyError, TypeError, ValueError, struct.error, RecursionError) as e:
    raise PackedFormatError(f"{source}: malformed payload: {e}") from e


def load(path: str | os.PathLike) -> PackedModel:
  """Reads a file written by :func:`save`; ``ValueError`` names what is wrong."""
  with open(path, "rb") as f:
    return from_bytes(f.read(), os.fspath(path))


def validate(packed: PackedModel, source: str = "<packed>") -> None:
  """Checks that every instruction is known, has usable attributes and finds its arrays
  with the right shapes/dtypes, that registers are defined before use, then that the
  program runs on its declared input shape within a memory bound
  (:func:`.check.check_program`, abstractly: nothing large is allocated), so that
  :func:`~irnet_jax.export.infer` cannot fail on a loaded file other than for its images."""
  if not isinstance(packed.program, list) or not isinstance(packed.meta, dict):
    raise PackedFormatError(f"{source}: the program must be a list and meta an object")
  defined = {INPUT}
  for n, ins in enumerate(packed.program):
    if not isinstance(ins, dict) or ins.get("op") not in OPS:
      op = ins.get("op") if isinstance(ins, dict) else ins
      raise PackedFormatError(f"{source}: instruction {n} has unknown op {op!r}")
    inputs, out = ins.get("inputs", []), ins.get("out")
    if not isinstance(inputs, list) or not all(isinstance(r, str) for r in inputs) \
        or not isinstance(out, str):
      raise PackedFormatError(f"{source}: instruction {n} ({ins['op']}) needs 'inputs' "
                              "(a list of register names) and 'out' (a register name)")
    missing = [r for r in inputs if r not in defined]
    if missing:
      raise PackedFormatError(f"{source}: instruction {n} ({ins['op']}) reads undefined "
                              f"registers {missing}")
    try:
      check_attributes(ins)  # first: expected_arrays divides by some of them
      expected = expected_arrays(ins)
    except (KeyError, TypeError, ValueError, ArithmeticError) as e:
      raise PackedFormatError(f"{source}: instruction {n} ({ins['op']}) has a missing or "
                              f"malformed attribute ({type(e).__name__}: {e})") from e
    for key, (shape, dtype) in expected.items():
      arr = packed.arrays.get(key)
      if arr is None:
        raise PackedFormatError(f"{source}: array {key!r} is missing")
      if arr.dtype != np.dtype(dtype) or (shape is not None and arr.shape != shape):
        raise PackedFormatError(f"{source}: array {key!r} is {arr.dtype}{list(arr.shape)}, "
                                f"expected {dtype}{list(shape) if shape else ''}")
    defined.add(out)
  if not isinstance(packed.output, str) or packed.output not in defined:
    raise PackedFormatError(f"{source}: output register {packed.output!r} is never written")
  try:
    check_program(packed)
  except ValueError as e:
    raise PackedFormatError(f"{source}: {e}") from e
