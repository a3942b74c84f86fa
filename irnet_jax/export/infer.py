"""Runs a :class:`~irnet_jax.export.PackedModel` with XOR + popcount binary layers.

A binary convolution (binary weights and binary activations) becomes, per output
position ``p`` and output channel ``o``, a dot product of two {-1, 0, +1} vectors of
length ``K = kh * kw * in`` (the im2col patch and the kernel column). Each vector is
two bit-planes in the library layout of :mod:`irnet_jax.bits` (element ``k`` in
word ``k // 32``, bit ``k % 32``):

* sign: bit set where the value is negative;
* mask: bit set where the value is nonzero (and inside the image).

With ``m = mask_a AND mask_w`` the dot product is exact::

    a . w = popcount(m) - 2 * popcount((sign_a XOR sign_w) AND m)

since every position in ``m`` contributes ``+1`` when the signs agree and ``-1``
when they differ, and every other position contributes 0. This covers

* zero padding: padded taps are outside the image, their mask bit is 0 (they
  contribute 0, exactly like ``conv(sign(x))`` zero-padded *after* the sign);
* ``sign(0) = 0`` activations (BN/hardtanh can output exact zeros): mask bit 0;
* zero weights (``has_zeros`` layers): the stored weight mask.

When the weights have no zeros (the normal case) ``m = mask_a`` and
``popcount(m)`` is a per-position count, so the GEMM inner loop is
``popcount((sign_a XOR sign_w) AND mask_a)``: three integer ops per 32 MACs. A binary
dense layer is the same dot product with ``K = in`` (one row per input vector).

Exactness. The popcount result is an exact integer. Times a power-of-two scale
(Libra-PB's ``2^exp``; 1 for plain "sign" weights) it is bitwise the float model's
convolution output (sums of +-2^e below 2^24 * 2^e are exact in float32). A float
scale (XNOR-Net / Bi-Real / ReActNet's per-channel ``mean|w|``) is exact too: the
layers convolve with ``sign(w)`` and multiply the output by ``alpha`` (XNOR-Net's own
formulation, :meth:`irnet_jax.layers.BinaryConv._kernel_and_scale`), so both sides
round ``alpha * integer`` once. RSign's ``x - threshold``, the bias and RPReLU are the
model's own float ops.

Float parts (stem, shortcuts, BN, classifier, generic operations) use the same
jnp/lax expressions as the model, rounded the same way (products are kept from
being contracted into FMAs with the add that follows, see :func:`_no_fma`), so with
power-of-two scales every value that reaches a ``sign`` is bitwise what the model's
eager ``model.eval()(x)`` computes, and the logits agree up to float rounding of the
layers after the last binarization (bitwise for every registry network and for
Libra-PB and "sign" models in the tests, on CPU). (A *jitted* float forward
contracts its BN into FMAs: a value within an ulp of 0 can then binarize
differently, so agreement with it is exact only up to such rare flips.)

Execution: ``infer(mode="program")`` jits the whole program; each binary GEMM
sits behind a fusion barrier (see ``_fusion_barrier``). ``mode="layers"`` jits every
instruction on its own (compiled once per distinct layer shape).

Loading a file checks what infer relies on (:mod:`irnet_jax.export.check`), so that
a crafted file fails in ``load``, not here.
"""
from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from irnet_jax import layers, ops
from irnet_jax.bits import pack_bits
from irnet_jax.export.pack import (
  BINARY_OPS,
  INPUT,
  OPS,
  UNARY_OPS,
  PackedModel,
  binary_kernel,
  weight_scale,
)
from irnet_jax.models.blocks import option_a_shortcut

_DIMS = ("NHWC", "HWIO", "NHWC")


def _popcount_gemm(a_sign: Sequence[jax.Array], a_mask: Sequence[jax.Array],
                   w_sign: jax.Array, w_mask: jax.Array | None) -> jax.Array:
  """``sum_i valid_i - 2 popcount((a_sign[i] XOR w_sign[:, i]) AND mask_i)``.

  ``a_sign[i]``, ``a_mask[i]``: word ``i`` of the activations, uint32 ``(..., 1)``;
  ``w_sign``, ``w_mask``: ``(O, W)``. Returns int32 ``(..., O)``. The loop over words is
  unrolled so that XLA fuses the whole GEMM, including the slicing that produces
  ``a_*[i]``, into one elementwise kernel over ``(..., O)`` (vectorized along O),
  with no ``(..., O, W)`` intermediate and no materialized im2col.
  """
  pc = jax.lax.population_count
  mismatch = valid = 0
  for i, (s, m) in enumerate(zip(a_sign, a_mask)):
    if w_mask is not None:
      m = m & w_mask[:, i]
      valid = valid + pc(m).astype(jnp.int32)
    mismatch = mismatch + pc((s ^ w_sign[:, i]) & m).astype(jnp.int32)
  if w_mask is None:  # valid taps do not depend on the output channel
    valid = sum(pc(m).astype(jnp.int32) for m in a_mask)
  return valid - 2 * mismatch


def popcount_dot(a_sign: jax.Array, a_mask: jax.Array, w_sign: jax.Array,
                 w_mask: jax.Array | None = None) -> jax.Array:
  """Dot products of packed {-1, 0, +1} vectors: ``(P, W), (O, W) -> (P, O)`` int32.

  Args:
    a_sign, a_mask: activation bit-planes, uint32 ``(P, W)``; ``a_sign`` must be a
      subset of ``a_mask`` (a zero has its sign bit clear).
    w_sign: weight sign bits, uint32 ``(O, W)``.
    w_mask: weight nonzero bits ``(O, W)``, or None when every weight is +-1.
  """
  nw = a_sign.shape[1]
  return _popcount_gemm([a_sign[:, i:i + 1] for i in range(nw)],
                        [a_mask[:, i:i + 1] for i in range(nw)], w_sign, w_mask)


def _out_size(n: int, k: int, stride: int, padding: int) -> int:
  return (n + 2 * padding - k) // stride + 1


def _taps(x: jax.Array, k: int, stride: int, padding: int) -> list[jax.Array]:
  """The ``k*k`` shifted, strided views of zero-padded ``x (N, H, W, C)`` that an
  im2col would concatenate, taps ``(i, j)`` in row-major order; each
  ``(N, Ho, Wo, C)``. Slices fuse into their consumer: nothing is materialized."""
  n, h, w, c = x.shape
  ho, wo = _out_size(h, k, stride, padding), _out_size(w, k, stride, padding)
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  return [jax.lax.slice(x, (0, i, j, 0),
                        (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                        (1, stride, stride, 1))
          for i in range(k) for j in range(k)]


def activation_words(x: jax.Array, k: int, stride: int,
                     padding: int) -> tuple[list[jax.Array], list[jax.Array]]:
  """Sign and nonzero bit-planes of the im2col patches of ``sign(x)``, per word.

  ``x (N, H, W, C)`` float -> two lists of ``ceil(k*k*C / 32)`` uint32 arrays
  ``(N, Ho, Wo, 1)``: word ``q`` of every patch, in the layout of :mod:`irnet_jax.bits`.
  Padded taps have mask 0. The channels are packed once per pixel (not k*k times
  per patch) and words are assembled from shifted views:

  * ``C % 32 == 0``: every tap starts on a word boundary; word ``q`` is word
    ``q % (C/32)`` of tap ``q // (C/32)``;
  * ``32 % C == 0`` (e.g. ResNet-20's 16 channels): ``32 / C`` taps share a word,
    tap ``t`` at bit offset ``(t % (32/C)) * C``;
  * otherwise: a materialized im2col, packed afterwards (no model here needs it).
  """
  c = x.shape[-1]
  planes = (x < 0, x != 0)
  if c % 32 != 0 and 32 % c != 0:
    out = []
    for plane in planes:
      words = pack_bits(jnp.concatenate(_taps(plane, k, stride, padding), axis=-1))
      out.append([words[..., q:q + 1] for q in range(words.shape[-1])])
    return out[0], out[1]
  out = []
  for plane in planes:
    taps = _taps(pack_bits(plane), k, stride, padding)  # (N, Ho, Wo, ceil(C/32)) each
    if c % 32 == 0:
      out.append([t[..., q:q + 1] for t in taps for q in range(c // 32)])
    else:
      g = 32 // c
      words = []
      for q in range(-(-len(taps) // g)):
        group = taps[q * g:(q + 1) * g]
        word = group[0]
        for t, tap in enumerate(group[1:], 1):
          word = word | (tap << jnp.uint32(t * c))
        words.append(word)
      out.append(words)
  return out[0], out[1]


def _no_fma(y: jax.Array, x: jax.Array) -> jax.Array:
  """``y`` (a product with factor ``x``), kept from being contracted into an FMA with a
  following add. XLA CPU contracts a multiply feeding an add inside a fusion into one
  FMA (one rounding instead of two), which moves the result by an ulp from the model's
  eager (unfused) forward; near 0 that flips the next sign(). A select between the two
  ops blocks the contraction (an optimization_barrier does not). ``x == x`` is false
  only for NaN ``x``, where the product is NaN as well."""
  return jnp.where(x == x, y, x)


def _fusion_barrier(ins, fn, x, p):
  """``fn(x, p)`` materialized: left alone, XLA CPU fuses a popcount GEMM (elementwise
  looking) into its consumers -- including the next layer's bit-packing reduction,
  which then recomputes it per channel without vectorization (~10x slower end to end,
  and much longer compiles); optimization_barrier does not stop it. A conditional's
  operands and results are always materialized. Both branches are the same GEMM, so
  the (runtime) predicate is irrelevant."""
  if not ins.get("fusion_barrier", True):  # already alone in its own jitted computation
    return fn(x, p)
  return jax.lax.cond(p["sign"][0, 0] > 0, fn, fn, x, p)


def _binary_input(ins, p, x):
  """The input the sign sees: ``x - act_shift`` with ReActNet's RSign, else ``x``."""
  x = x.astype(jnp.float32)
  return x - p["act_shift"] if ins.get("act_shift") else x


def _scaled(ins, p, dot):
  """The int32 popcount dot product times the per-channel weight scale."""
  scale = weight_scale(ins, p)
  y = dot.astype(jnp.float32) * scale
  # 2^e: exact, no rounding to keep apart. A float scale: one rounding, then the bias.
  return y if ins.get("scale", "exp") == "exp" else _no_fma(y, scale)


def _finish(ins, p, y):
  """Bias, then RPReLU, as BinaryConv/BinaryDense._finish."""
  if ins.get("bias"):
    y = y + p["bias"]
  if ins.get("rprelu"):
    y = ops.rprelu(y, p["rprelu.shift_in"], p["rprelu.slope"], p["rprelu.shift_out"])
  return y


def _conv(ins, p, x):
  k, s, pad = ins["kernel_size"], ins["strides"], ins["padding"]
  x = _binary_input(ins, p, x) if ins["binary_acts"] else x
  if ins["binary_weights"] and ins["binary_acts"]:
    def gemm(x, p):  # -> (N, Ho, Wo, O) int32
      a_sign, a_mask = activation_words(x, k, s, pad)
      return _popcount_gemm(a_sign, a_mask, p["sign"],
                            p["nonzero"] if ins["has_zeros"] else None)

    return _finish(ins, p, _scaled(ins, p, _fusion_barrier(ins, gemm, x, p)))
  # Float convolution (float layers, 1w32a weight-only layers, 32w1a layers): the
  # exact lax call of BinaryConv.__call__, on the same kernel values.
  kernel = binary_kernel(ins, p) if ins["binary_weights"] else p["kernel"]
  if ins["binary_acts"]:
    x = jnp.sign(x)
  y = jax.lax.conv_general_dilated(
      x.astype(jnp.float32), kernel.astype(jnp.float32), window_strides=(s, s),
      padding=((pad, pad), (pad, pad)), dimension_numbers=_DIMS)
  return _finish(ins, p, y)


def _dense(ins, p, x):
  """BinaryDense: ``x (..., in) -> (..., out)``; the same dot products as a 1x1 conv."""
  x = _binary_input(ins, p, x) if ins["binary_acts"] else x
  if ins["binary_weights"] and ins["binary_acts"]:
    def gemm(x, p):  # -> (..., O) int32
      k = x.shape[-1]
      rows = x.reshape(-1, k)
      dot = popcount_dot(pack_bits(rows < 0), pack_bits(rows != 0), p["sign"],
                         p["nonzero"] if ins["has_zeros"] else None)
      return dot.reshape(*x.shape[:-1], -1)

    return _finish(ins, p, _scaled(ins, p, _fusion_barrier(ins, gemm, x, p)))
  kernel = binary_kernel(ins, p) if ins["binary_weights"] else p["kernel"]
  if ins["binary_acts"]:
    x = jnp.sign(x)
  return _finish(ins, p, jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32)))


def _bn(ins, p, x):
  """BatchNorm.__call__ in eval mode (x * mul + (bias - mean * mul)), rounded like
  the model's eager forward (:func:`_no_fma`)."""
  del ins
  x = x.astype(jnp.float32)
  mean_mul = _no_fma(p["mean"] * p["mul"], p["mean"])
  return _no_fma(x * p["mul"], x) + (p["bias"] - mean_mul)


def _nnx_bn(ins, p, x):
  """flax's nnx.BatchNorm in eval mode: ``(x - mean) * mul [+ bias]``."""
  y = x.astype(jnp.float32) - p["mean"]
  y = _no_fma(y * p["mul"], y)
  return y + p["bias"] if ins["bias"] else y


def _linear(ins, p, x):
  """nnx.Linear: dot_general over the last axis, then the bias."""
  y = jax.lax.dot_general(x, p["kernel"], (((x.ndim - 1,), (0,)), ((), ())))
  return y + p["bias"] if ins.get("bias", True) else y


def _nnx_conv(ins, p, x):
  """nnx.Conv (2D, NHWC, HWIO): its lax call, then the bias."""
  padding = ins["padding"]
  y = jax.lax.conv_general_dilated(
      x, p["kernel"], tuple(ins["strides"]),
      padding if isinstance(padding, str) else tuple(map(tuple, padding)),
      lhs_dilation=tuple(ins["lhs_dilation"]), rhs_dilation=tuple(ins["rhs_dilation"]),
      dimension_numbers=_DIMS, feature_group_count=ins["feature_group_count"])
  return y + p["bias"] if ins["bias"] else y


def _flatten_chw(ins, p, x):
  del ins, p
  # torch's (C, H, W) flatten order, as in VGGSmall (format version 1 programs).
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


# --- generic instructions: the lax primitive of the same name -----------------------


def _broadcasting(fn):
  return lambda ins, p, *xs: fn(*jnp.broadcast_arrays(*xs))


def _mul(a, b):
  y = jax.lax.mul(a, b)
  return _no_fma(y, a) if jnp.issubdtype(y.dtype, jnp.floating) else y


_LAX_NAMES = {"not": "bitwise_not", "and": "bitwise_and", "or": "bitwise_or",
              "xor": "bitwise_xor"}
_UNARY = {op: _broadcasting(getattr(jax.lax, _LAX_NAMES.get(op, op)))
          for op in UNARY_OPS if op not in ("round", "integer_pow", "convert_element_type",
                                            "expand_dims")}
_BINARY = {op: _broadcasting(_mul if op == "mul" else getattr(jax.lax, _LAX_NAMES.get(op, op)))
           for op in BINARY_OPS}


def _const(ins, p):
  if "value" in p:  # an array (named), else a scalar attribute
    return jnp.asarray(p["value"]).astype(ins["dtype"])
  return jnp.asarray(ins["value"], ins["dtype"])


def _slice(ins, p, x):
  limit = [n if end is None else end for end, n in zip(ins["limit"], x.shape)]
  return jax.lax.slice(x, tuple(ins["start"]), tuple(limit),
                       None if ins["strides"] is None else tuple(ins["strides"]))


def _reduce_window(init, fn):
  def run(ins, p, x):
    return jax.lax.reduce_window(
        x, init, fn, tuple(ins["window_dimensions"]), tuple(ins["window_strides"]),
        tuple(map(tuple, ins["padding"])), tuple(ins["base_dilation"]),
        tuple(ins["window_dilation"]))
  return run


def _dot_general(ins, p, a, b):
  (lc, rc), (lb, rb) = ins["dimension_numbers"]
  return jax.lax.dot_general(a, b, ((tuple(lc), tuple(rc)), (tuple(lb), tuple(rb))),
                             preferred_element_type=ins["preferred_element_type"])


def _conv_general_dilated(ins, p, x, k):
  return jax.lax.conv_general_dilated(
      x, k, tuple(ins["window_strides"]), tuple(map(tuple, ins["padding"])),
      tuple(ins["lhs_dilation"]), tuple(ins["rhs_dilation"]),
      jax.lax.ConvDimensionNumbers(*map(tuple, ins["dimension_numbers"])),
      ins["feature_group_count"], ins["batch_group_count"],
      preferred_element_type=ins["preferred_element_type"])


_OPS = {
    # Layers.
    "conv": _conv,
    "dense": _dense,
    "bn": _bn,
    "nnx_bn": _nnx_bn,
    "linear": _linear,
    "nnx_conv": _nnx_conv,
    # Generic.
    **_UNARY,
    **_BINARY,
    "round": lambda ins, p, x: jax.lax.round(x, ins["rounding_method"]),
    "integer_pow": lambda ins, p, x: jax.lax.integer_pow(x, ins["y"]),
    "convert_element_type": lambda ins, p, x: x.astype(ins["dtype"]),
    "expand_dims": lambda ins, p, x: jnp.expand_dims(x, tuple(ins["axes"])),
    "select_n": _broadcasting(jax.lax.select_n),
    "clamp": _broadcasting(jax.lax.clamp),
    "act": lambda ins, p, x: ops.ACTIVATIONS[ins["fn"]](x),
    "const": _const,
    "max_pool": lambda ins, p, x: layers.max_pool(x, ins["window"], ins["stride"],
                                                  ins["padding"]),
    "mean": lambda ins, p, x: jnp.mean(x, axis=tuple(ins["axes"]),
                                       keepdims=ins.get("keepdims", False)),
    "reshape": lambda ins, p, x: x.reshape(x.shape[0], *ins["shape"]),
    "squeeze": lambda ins, p, x: jax.lax.squeeze(x, tuple(ins["dimensions"])),
    "transpose": lambda ins, p, x: jax.lax.transpose(x, tuple(ins["permutation"])),
    "slice": _slice,
    "pad": lambda ins, p, x: jax.lax.pad(x, jnp.asarray(ins["value"], x.dtype),
                                         tuple(map(tuple, ins["padding_config"]))),
    "concatenate": lambda ins, p, *xs: jax.lax.concatenate(xs, ins["dimension"]),
    "reduce_sum": lambda ins, p, x: jax.lax.reduce_sum(x, tuple(ins["axes"])),
    "reduce_max": lambda ins, p, x: jax.lax.reduce_max(x, tuple(ins["axes"])),
    "reduce_min": lambda ins, p, x: jax.lax.reduce_min(x, tuple(ins["axes"])),
    "reduce_prod": lambda ins, p, x: jax.lax.reduce_prod(x, tuple(ins["axes"])),
    "reduce_window_max": _reduce_window(-jnp.inf, jax.lax.max),
    "reduce_window_min": _reduce_window(jnp.inf, jax.lax.min),
    "reduce_window_sum": _reduce_window(0.0, jax.lax.add),
    "dot_general": _dot_general,
    "conv_general_dilated": _conv_general_dilated,
    # Format version 1 programs.
    "avg_pool": lambda ins, p, x: layers.global_avg_pool(x),
    "shortcut_a": lambda ins, p, x: option_a_shortcut(x, ins["planes"]),
    "flatten_chw": _flatten_chw,
}
assert set(_OPS) == set(OPS), set(_OPS) ^ set(OPS)
NOT_ATTRS = ("op", "name", "inputs", "out")


def apply_instruction(ins: dict[str, Any], params: dict[str, jax.Array],
                      *xs: jax.Array) -> jax.Array:
  """Runs one instruction (traceable); ``params`` keyed by field, see :func:`layer_params`."""
  if ins["op"] not in _OPS:
    raise ValueError(f"unknown op {ins['op']!r} in program")
  return _OPS[ins["op"]](ins, params, *xs)


def _frozen(v: Any) -> Any:
  """JSON attribute values as hashable ones (lists -> tuples)."""
  return tuple(map(_frozen, v)) if isinstance(v, (list, tuple)) else v


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_jit(op: str, attrs: tuple, p: dict[str, jax.Array], *xs: jax.Array):
  # One compilation per (op, attributes, shapes), shared by all layers and models.
  # Each instruction is its own computation, so no fusion barrier is needed.
  return _OPS[op](dict(attrs, op=op, fusion_barrier=False), p, *xs)


def layer_params(program: list[dict[str, Any]],
                 arrays: dict[str, Any]) -> list[dict[str, Any]]:
  """Per instruction, its arrays keyed by field (``"sign"``, ``"mean"``, ...)."""
  out = []
  for ins in program:
    prefix = f"{ins.get('name')}/"
    out.append({k[len(prefix):]: v for k, v in arrays.items()
                if "name" in ins and k.startswith(prefix)})
  return out


def run_program(program: list[dict[str, Any]], output: str,
                params: list[dict[str, jax.Array]], images: jax.Array, *,
                jit_layers: bool = False) -> jax.Array:
  """Interprets ``program`` on NHWC ``images``; ``params`` from :func:`layer_params`.

  Traceable (``jit_layers=False``: :func:`infer` jits the whole program), or
  dispatching every instruction to a per-layer jitted function (``jit_layers=True``).
  """
  regs = {INPUT: images.astype(jnp.float32)}
  for ins, p in zip(program, params):
    xs = [regs[r] for r in ins["inputs"]]
    if jit_layers and ins["op"] in _OPS:
      attrs = tuple(sorted((k, _frozen(v)) for k, v in ins.items() if k not in NOT_ATTRS))
      regs[ins["out"]] = _apply_jit(ins["op"], attrs, p, *xs)
    else:
      regs[ins["out"]] = apply_instruction(ins, p, *xs)
  return regs[output]


MODES = ("program", "layers")


def infer(packed: PackedModel, images: jax.Array | np.ndarray, *,
          mode: str = "program") -> jax.Array:
  """Logits ``(N, classes)`` float32 of NHWC ``images`` (normalized floats).

  Equals ``model.eval()(images)`` of the packed model up to float rounding of the
  float layers after the last binarization (bitwise, in practice, on CPU), with
  power-of-two weight scales; with float ``mean|w|`` scales up to a few ulps per
  binary layer and the sign flips they can cause (see the module doc).

  Args:
    packed: from :func:`~irnet_jax.export.pack` or :func:`~irnet_jax.export.load`.
    images: ``(N, H, W, C)``, normalized like the training data (or the shape the
      model was packed for, ``meta["input_shape"]``, with any batch size).
    mode: "program" (default) jits the whole network as one XLA computation
      (fastest; one compilation per input shape, a few seconds for ResNet-20 and
      ~10 s for ResNet-18/34 on CPU), shared by packed models with the same
      program. "layers" jits each instruction on its own, one compilation per
      distinct (op, attributes, shapes) shared across layers and models
      (compiles the least when many models are checked; runs 1.5-3x slower: a
      dispatch per instruction and no cross-layer fusion).
  """
  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
  images = jnp.asarray(images, jnp.float32)
  cin, shape = packed.meta.get("in_channels"), packed.meta.get("input_shape")
  ndim = len(shape) + 1 if isinstance(shape, list) else 4
  if images.ndim != ndim or (cin is not None and images.shape[-1] != cin):
    layout = "NHWC" if ndim == 4 else f"rank {ndim}"
    raise ValueError(f"images must be {layout} with {cin} channels (the model was packed "
                     f"for {shape or 'NHWC'}), got shape {images.shape}")
  cache = packed._cache  # pylint: disable=protected-access
  if "params" not in cache:
    cache["params"] = layer_params(
        packed.program, {k: jnp.asarray(v) for k, v in packed.arrays.items()})
  if mode == "layers":
    return run_program(packed.program, packed.output, cache["params"], images,
                       jit_layers=True)
  if "fn" not in cache:
    cache["fn"] = _program_fn(json.dumps([packed.program, packed.output], sort_keys=True))
  return cache["fn"](cache["params"], images)


@functools.lru_cache(maxsize=16)
def _program_fn(program_json: str):
  # Keyed by the program text, so that packed models with the same architecture
  # (e.g. the same file loaded twice) share one jitted function and its compilations.
  program, output = json.loads(program_json)
  return jax.jit(functools.partial(run_program, program, output))

