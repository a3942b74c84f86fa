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
``popcount((sign_a XOR sign_w) AND mask_a)``: three integer ops per 32 MACs. The
result is an exact integer; times the layer's ``2^exp`` it is bitwise the float
model's convolution output (sums of +-2^e below 2^24 * 2^e are exact in float32).

Float parts (stem, shortcuts, BN, classifier) use the same jnp/lax expressions as
the model, rounded the same way (BN is kept from being contracted into FMAs, see
``_bn``), so every value that reaches a ``sign`` is bitwise what the model's eager
``model.eval()(x)`` computes, and the logits agree up to float rounding of the
layers after the last binarization. (A *jitted* float forward contracts its BN
into FMAs: a value within an ulp of 0 can then binarize differently, so agreement
with it is exact only up to such rare flips.)

Execution: ``infer(mode="program")`` jits the whole program; each binary GEMM
sits behind a fusion barrier (see ``_conv``). ``mode="layers"`` jits every
instruction on its own (compiled once per distinct layer shape).
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
from irnet_jax.export.pack import INPUT, PackedModel, binary_kernel, scale_from_exponent
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


def _conv(ins, p, x):
  k, s, pad = ins["kernel_size"], ins["strides"], ins["padding"]
  if ins["binary_weights"] and ins["binary_acts"]:
    def gemm(x, p):  # -> (N, Ho, Wo, O) int32
      a_sign, a_mask = activation_words(x, k, s, pad)
      return _popcount_gemm(a_sign, a_mask, p["sign"],
                            p["nonzero"] if ins["has_zeros"] else None)

    if ins.get("fusion_barrier", True):
      # Left alone, XLA CPU fuses this elementwise-looking GEMM into its
      # consumers -- including the next layer's bit-packing reduction, which then
      # recomputes it per channel without vectorization (~10x slower end to end,
      # and much longer compiles); optimization_barrier does not stop it. A
      # conditional's operands and results are always materialized. Both branches
      # are the same GEMM, so the (runtime) predicate is irrelevant.
      dot = jax.lax.cond(p["exp"][0] > 0, gemm, gemm, x, p)
    else:  # already alone in its own jitted computation ("layers" mode)
      dot = gemm(x, p)
    return dot.astype(jnp.float32) * scale_from_exponent(p["exp"])
  # Float convolution (float layers, 1w32a weight-only layers, 32w1a layers): the
  # exact lax call of BinaryConv.__call__, on the same kernel values.
  kernel = binary_kernel(ins, p) if ins["binary_weights"] else p["kernel"]
  if ins["binary_acts"]:
    x = jnp.sign(x)
  return jax.lax.conv_general_dilated(
      x.astype(jnp.float32), kernel.astype(jnp.float32), window_strides=(s, s),
      padding=((pad, pad), (pad, pad)), dimension_numbers=_DIMS)


def _bn(ins, p, x):
  """BatchNorm.__call__ in eval mode (x * mul + (bias - mean * mul)), rounded like
  the model's eager forward."""
  del ins
  x = x.astype(jnp.float32)
  # XLA CPU contracts a multiply feeding an add inside a fusion into one FMA (one
  # rounding instead of two), which moves the result by an ulp from the model's
  # unfused BN; near 0 that flips the next sign(). A select between the two ops
  # blocks the contraction (an optimization_barrier does not). v == v is false only
  # for NaN v, where the product is NaN as well.
  mean_mul = p["mean"] * p["mul"]
  mean_mul = jnp.where(p["mean"] == p["mean"], mean_mul, p["mean"])
  y = x * p["mul"]
  y = jnp.where(x == x, y, x)
  return y + (p["bias"] - mean_mul)


def _linear(ins, p, x):
  del ins
  y = jax.lax.dot_general(x, p["kernel"], (((x.ndim - 1,), (0,)), ((), ())))
  return y + p["bias"]


def _flatten_chw(ins, p, x):
  del ins, p
  # torch's (C, H, W) flatten order, as in VGGSmall.
  return jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)


_OPS = {
    "conv": _conv,
    "bn": _bn,
    "act": lambda ins, p, x: ops.ACTIVATIONS[ins["fn"]](x),
    "add": lambda ins, p, a, b: a + b,
    "max_pool": lambda ins, p, x: layers.max_pool(x, ins["window"], ins["stride"],
                                                  ins["padding"]),
    "avg_pool": lambda ins, p, x: layers.global_avg_pool(x),
    "shortcut_a": lambda ins, p, x: option_a_shortcut(x, ins["planes"]),
    "flatten_chw": _flatten_chw,
    "linear": _linear,
}
_NOT_ATTRS = ("op", "name", "inputs", "out")


def apply_instruction(ins: dict[str, Any], params: dict[str, jax.Array],
                      *xs: jax.Array) -> jax.Array:
  """Runs one instruction (traceable); ``params`` keyed by field, see :func:`layer_params`."""
  if ins["op"] not in _OPS:
    raise ValueError(f"unknown op {ins['op']!r} in program")
  return _OPS[ins["op"]](ins, params, *xs)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_jit(op: str, attrs: tuple, p: dict[str, jax.Array], *xs: jax.Array):
  # One compilation per (op, attributes, shapes), shared by all layers and models.
  # Each instruction is its own computation, so no fusion barrier is needed.
  return _OPS[op](dict(attrs, fusion_barrier=False), p, *xs)


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
      attrs = tuple(sorted((k, v) for k, v in ins.items() if k not in _NOT_ATTRS))
      regs[ins["out"]] = _apply_jit(ins["op"], attrs, p, *xs)
    else:
      regs[ins["out"]] = apply_instruction(ins, p, *xs)
  return regs[output]


MODES = ("program", "layers")


def infer(packed: PackedModel, images: jax.Array | np.ndarray, *,
          mode: str = "program") -> jax.Array:
  """Logits ``(N, classes)`` float32 of NHWC ``images`` (normalized floats).

  Equals ``model.eval()(images)`` of the packed model up to float rounding of the
  float layers after the last binarization (bitwise, in practice, on CPU).

  Args:
    packed: from :func:`~irnet_jax.export.pack` or :func:`~irnet_jax.export.load`.
    images: ``(N, H, W, C)``, normalized like the training data.
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
  cin = packed.meta.get("in_channels")
  if images.ndim != 4 or (cin is not None and images.shape[-1] != cin):
    raise ValueError(f"images must be NHWC with {cin} channels, got shape {images.shape}")
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
