"""The load-time check of a packed model (:func:`irnet_jax.export.format.validate`):
what :func:`irnet_jax.export.infer` relies on, so that a damaged or crafted file
fails in ``load`` with one error naming the problem, never later in ``infer`` (a
ZeroDivisionError, an IndexError, a wrong answer or a terabyte allocation).

:func:`check_attributes` checks each instruction's attributes; :func:`check_program`
traces the program on abstract inputs of the declared input shape (nothing is
allocated) within a memory bound derived from the file itself.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from irnet_jax.bits import num_words
from irnet_jax.export.infer import NOT_ATTRS, apply_instruction, layer_params
from irnet_jax.export.pack import INPUT, LAYER_OPS, PackedModel

# infer unrolls one XLA op per kernel tap and per 32-bit word of a binary layer's
# reduction axis (K = kh * kw * in bits). Real layers are far below these bounds
# (ResNet-18's largest, 3x3x512: 9 taps, 144 words); a crafted file far above them
# would stall tracing (in load's check and in infer) instead of failing.
MAX_TAPS = 1024
MAX_WORDS = 1 << 14
# Integer attributes become XLA's int64 sizes, strides and paddings: a bound well below
# int64 leaves room for their sums and products (a larger value fails in lowering).
_MAX_INT = 1 << 31
# Memory (see _memory_budget): one example of the declared input has at most 2^24
# elements (a 2048x2048x4 image; ImageNet's 224x224x3 has 150K).
_MAX_INPUT = 1 << 24
_REGISTER_GROWTH = 1024
_TOTAL_GROWTH = 64
_BATCH = 2  # the batch size pack traces with (trace.BATCH): the batch axis stands apart


def _is_int(v: Any, low: int) -> bool:
  return isinstance(v, int) and not isinstance(v, bool) and low <= v < _MAX_INT


def _require_ints(ins: dict[str, Any], low: int, *keys: str) -> None:
  for key in keys:
    if not _is_int(ins[key], low):
      raise ValueError(f"{key} {ins[key]!r} is not an integer >= {low}")


def _check_value(key: str, v: Any, depth: int = 0) -> None:
  """An attribute is JSON numbers, strings and lists (a few levels deep) only:
  ``infer(mode="layers")`` hashes the attributes (a dict is not hashable) and XLA takes
  integers as int64."""
  if isinstance(v, list) and depth < 4:
    for item in v:
      _check_value(key, item, depth + 1)
  elif isinstance(v, int) and not isinstance(v, bool) and not -_MAX_INT < v < _MAX_INT:
    raise ValueError(f"attribute {key!r} holds {v}, beyond +-2^31")
  elif not isinstance(v, (type(None), bool, int, float, str)):
    raise ValueError(f"attribute {key!r} holds a {type(v).__name__}"
                     f"{' nested too deep' if isinstance(v, list) else ''}: attributes are "
                     "numbers, strings and lists of them")


def _check_binary_layer(ins: dict[str, Any]) -> None:
  """conv/dense attributes that infer uses as Python ints and flags (the array shapes
  they imply are checked by expected_arrays, after this)."""
  for key in ("binary_weights", "binary_acts", "has_zeros"):
    if not isinstance(ins[key], bool):
      raise ValueError(f"{key} {ins[key]!r} is not a boolean")
  _require_ints(ins, 1, "in_features", "out_features")
  taps = 1
  if ins["op"] == "conv":
    _require_ints(ins, 1, "kernel_size", "strides")
    _require_ints(ins, 0, "padding")
    taps = ins["kernel_size"] ** 2
  if taps > MAX_TAPS or num_words(taps * ins["in_features"]) > MAX_WORDS:
    raise ValueError(f"kernel of {taps} taps x {ins['in_features']} channels: over the "
                     f"{MAX_TAPS} taps or {MAX_WORDS} words infer unrolls")


def check_attributes(ins: dict[str, Any]) -> None:
  """Raises ValueError for an attribute of instruction ``ins`` (a dict with a known
  ``op``) that infer could not use; run before :func:`expected_arrays`, which divides by
  some of them."""
  for key, v in ins.items():
    if key not in NOT_ATTRS:
      _check_value(key, v)
  name = ins.get("name")
  if (ins["op"] in LAYER_OPS or name is not None) and not isinstance(name, str):
    raise ValueError(f"name {name!r} is not a string (layers find their arrays by it)")
  if ins["op"] in ("conv", "dense"):
    _check_binary_layer(ins)
  elif ins["op"] == "nnx_conv":
    _require_ints(ins, 1, "feature_group_count", "in_features", "out_features")
  elif ins["op"] == "max_pool":
    _require_ints(ins, 1, "window", "stride")
    _require_ints(ins, 0, "padding")


def input_shape(meta: dict[str, Any]) -> tuple[int, ...]:
  """One example's shape: ``meta["input_shape"]``, else (version 1 files do not record
  it) 32x32 with ``meta["in_channels"]``, a size every version-1 family runs at (CIFAR
  ResNets, VGG-small, and the globally pooled ImageNet ResNets)."""
  cin, shape = meta.get("in_channels"), meta.get("input_shape")
  if cin is not None and not _is_int(cin, 1):
    raise ValueError(f"meta in_channels {cin!r} is not a positive integer")
  if shape is None:
    if cin is None:
      raise ValueError("meta records neither input_shape nor in_channels")
    shape = [32, 32, cin]
  if not isinstance(shape, list) or not shape or not all(_is_int(d, 1) for d in shape):
    raise ValueError(f"meta input_shape {shape!r} is not a list of positive sizes")
  if cin is not None and shape[-1] != cin:
    raise ValueError(f"meta input_shape {shape} does not end with in_channels {cin}")
  if math.prod(shape) > _MAX_INPUT:
    raise ValueError(f"meta input_shape {shape} has over {_MAX_INPUT} elements")
  return tuple(shape)


def _nbytes(x: Any) -> int:
  return math.prod(x.shape) * x.dtype.itemsize


def _memory_budget(packed: PackedModel, shape: tuple[int, ...]) -> tuple[int, int]:
  """Bytes one register, and all registers together, may hold for a traced batch.

  Both scale with what the file itself describes: ``base``, the bytes of a batch of
  the declared input plus all the arrays. A layer resizes its input by its own arrays
  (output channels) and small strides and paddings, so in real networks one register is
  under 2 ``base`` (ResNet-20: 1.8, ResNet-18: 1.2) and the registers average about one
  ``base`` per instruction (ResNet-20: 1.0; ``infer(mode="layers")`` keeps them all).
  The bounds are ``_REGISTER_GROWTH`` and ``_TOTAL_GROWTH`` times those, orders of
  magnitude above real networks; with the declared input itself capped
  (``_MAX_INPUT``), a crafted padding, dilation, broadcast or channel count cannot ask
  for terabytes.
  """
  base = _BATCH * math.prod(shape) * 4 + packed.nbytes
  return _REGISTER_GROWTH * base, _TOTAL_GROWTH * (len(packed.program) + 1) * base


class _Problem(Exception):
  """A problem found while tracing the program abstractly, reported as is."""


def _check_layer_input(ins: dict[str, Any], xs: Sequence[Any]) -> None:
  """conv/dense read their input's channels as packed words without checking them
  against ``in_features`` (a mismatch would drop or misalign words silently)."""
  if ins["op"] not in ("conv", "dense") or len(xs) != 1:
    return
  shape = xs[0].shape
  if (ins["op"] == "conv" and len(shape) != 4) or not shape \
      or shape[-1] != ins["in_features"]:
    raise _Problem(f"input of shape {list(shape)} does not have in_features "
                   f"{ins['in_features']} channels" + (" (NHWC)" if ins["op"] == "conv" else ""))


def _shape_twin(ins: dict[str, Any]) -> dict[str, Any]:
  """The instruction traced in place of ``ins``: a binary GEMM (binary weights and
  activations) as the float convolution or product of the same kernel, which has the
  same output shape without tracing hundreds of unrolled word operations (ResNet-18's
  check: 0.9 s -> 0.05 s). What only the GEMM relies on (integer sizes, the input's
  channels, the loop bounds) is checked explicitly (:func:`_check_binary_layer`,
  :func:`_check_layer_input`)."""
  if ins["op"] in ("conv", "dense") and ins["binary_weights"] and ins["binary_acts"]:
    return dict(ins, binary_acts=False)
  return ins


def _check_register(y: Any, sizes: list[int], budget: tuple[int, int]) -> None:
  if not isinstance(y, jax.Array) or not y.size:
    raise _Problem(f"its output {list(getattr(y, 'shape', ()))} is empty or not an array")
  sizes.append(_nbytes(y))
  if sizes[-1] > budget[0] or sum(sizes) > budget[1]:
    raise _Problem(f"its output {list(y.shape)} {y.dtype} brings the registers of a batch to "
                   f"{sum(sizes):,} bytes, that one to {sizes[-1]:,}: over the bounds "
                   f"{budget[1]:,} and {budget[0]:,} set by the file's input and arrays")


def _trace_program(packed: PackedModel, x: jax.ShapeDtypeStruct,
                   budget: tuple[int, int]) -> list[int]:
  """Runs the program on abstract values (``jax.eval_shape``: nothing is allocated);
  returns every register's bytes. ValueError names the first instruction that fails."""
  arrays = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in packed.arrays.items()}
  sizes, at = [_nbytes(x)], [0, []]  # the instruction being traced, its input shapes

  def run(params, x):
    regs = {INPUT: x}
    for n, (ins, p) in enumerate(zip(packed.program, params)):
      xs = [regs[r] for r in ins["inputs"]]
      at[:] = n, [list(r.shape) for r in xs]
      _check_layer_input(ins, xs)
      regs[ins["out"]] = apply_instruction(_shape_twin(ins), p, *xs)
      _check_register(regs[ins["out"]], sizes, budget)
    return regs[packed.output]

  try:
    jax.eval_shape(run, layer_params(packed.program, arrays), x)
  except Exception as e:  # pylint: disable=broad-except
    # Whatever fails on abstract values (an index, stride, shape, dtype or arity) fails
    # the same way in infer's own trace.
    ins = packed.program[at[0]]
    what = str(e) if isinstance(e, _Problem) else f"{type(e).__name__}: {e}"
    raise ValueError(f"instruction {at[0]} ({ins['op']}"
                     f"{' ' + str(ins['name']) if 'name' in ins else ''}) on inputs of "
                     f"shapes {at[1]}: {what.splitlines()[0]}") from e
  return sizes


def check_program(packed: PackedModel) -> None:
  """Raises ValueError naming the first problem :func:`infer` would hit (other than in
  the images it is given): traces the program on abstract inputs of ``meta``'s input
  shape, so shapes, indices, strides, dtypes and arities are checked as infer's own
  trace checks them, and bounds the memory its registers ask for
  (:func:`_memory_budget`). Expects a program that passed
  :func:`~irnet_jax.export.format.validate`'s structural checks."""
  shape = input_shape(packed.meta)
  x = jax.ShapeDtypeStruct((_BATCH, *shape), jnp.float32)
  _trace_program(packed, x, _memory_budget(packed, shape))
