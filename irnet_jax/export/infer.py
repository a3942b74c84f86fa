"""Runs a :class:`~irnet_jax.export.PackedModel` with XOR + popcount binary layers.

A binary convolution (binary weights and binary activations) becomes, per output
position ``p`` and output channel ``o``, a dot product of two {-1, 0, +1} vectors of
length ``K = kh * kw * in`` (the im2col patch and the kernel column). Each vector is
two bit-planes in the layout of :mod:`.pack` (element ``k`` in word ``k // 32``,
bit ``k % 32``):

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
the model, so every value that reaches a ``sign`` is bitwise the float model's,
and the logits agree up to float rounding of the last layers.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from irnet_jax import layers, ops
from irnet_jax.export.pack import INPUT, PackedModel, pack_bits, scale_from_exponent
from irnet_jax.models.blocks import option_a_shortcut

_DIMS = ("NHWC", "HWIO", "NHWC")


def popcount_dot(a_sign: jax.Array, a_mask: jax.Array, w_sign: jax.Array,
                 w_mask: jax.Array | None = None) -> jax.Array:
  """Dot products of packed {-1, 0, +1} vectors: ``(P, W), (O, W) -> (P, O)`` int32.

  Args:
    a_sign, a_mask: activation bit-planes, uint32 ``(P, W)``; ``a_sign`` must be a
      subset of ``a_mask`` (a zero has its sign bit clear).
    w_sign: weight sign bits, uint32 ``(O, W)``.
    w_mask: weight nonzero bits ``(O, W)``, or None when every weight is +-1.

  The loop over words is unrolled so that XLA fuses the whole GEMM into a single
  elementwise kernel over ``(P, O)`` (vectorized along ``O``) instead of
  materializing a ``(P, O, W)`` intermediate.
  """
  pc = jax.lax.population_count
  p, nw = a_sign.shape
  o = w_sign.shape[0]
  mismatch = jnp.zeros((p, o), jnp.int32)
  valid = jnp.zeros((p, o), jnp.int32)
  for i in range(nw):
    m = a_mask[:, i:i + 1]
    if w_mask is not None:
      m = m & w_mask[None, :, i]
      valid = valid + pc(m).astype(jnp.int32)
    diff = (a_sign[:, i:i + 1] ^ w_sign[None, :, i]) & m
    mismatch = mismatch + pc(diff).astype(jnp.int32)
  if w_mask is None:
    valid = jnp.sum(pc(a_mask).astype(jnp.int32), axis=1, keepdims=True)
  return valid - 2 * mismatch


def _im2col(x: jax.Array, k: int, stride: int, padding: int) -> jax.Array:
  """``(N, H, W, C) -> (N, Ho, Wo, k*k*C)``, zero padded; taps ``(i, j)`` row-major,
  then channels: the HWIO flattening order of the kernel."""
  n, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  ho = (h + 2 * padding - k) // stride + 1
  wo = (w + 2 * padding - k) // stride + 1
  cols = [jax.lax.slice(x, (0, i, j, 0),
                        (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                        (1, stride, stride, 1))
          for i in range(k) for j in range(k)]
  return jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]


def pack_activations(x: jax.Array, k: int, stride: int,
                     padding: int) -> tuple[jax.Array, jax.Array]:
  """Sign and nonzero bit-planes of the im2col patches of ``sign(x)``.

  ``x (N, H, W, C)`` float -> two uint32 ``(N, Ho, Wo, ceil(k*k*C / 32))``.
  With ``C % 32 == 0`` the channels are packed per pixel first and im2col moves
  whole words (k*k times less packing work); the bit layout is the same because
  every tap then starts on a word boundary.
  """
  neg, nonzero = x < 0, x != 0
  if x.shape[-1] % 32 == 0:
    return (_im2col(pack_bits(neg), k, stride, padding),
            _im2col(pack_bits(nonzero), k, stride, padding))
  return (pack_bits(_im2col(neg, k, stride, padding)),
          pack_bits(_im2col(nonzero, k, stride, padding)))


def _unpacked_kernel(ins: dict[str, Any], p: dict[str, jax.Array]) -> jax.Array:
  """The float ``+-2^e`` (or 0) HWIO kernel of a binary-weight layer (traced)."""
  k, cin, cout = ins["kernel_size"], ins["in_features"], ins["out_features"]
  shifts = jnp.arange(32, dtype=jnp.uint32)

  def bits(words):  # (O, W) -> (O, K) in {0, 1}
    b = (words[..., None] >> shifts) & jnp.uint32(1)
    return b.reshape(cout, -1)[:, :k * k * cin].astype(jnp.float32)

  val = 1.0 - 2.0 * bits(p["sign"])
  if ins["has_zeros"]:
    val = val * bits(p["nonzero"])
  val = val * scale_from_exponent(p["exp"])[:, None]
  return val.T.reshape(k, k, cin, cout)


def _conv(ins, p, x):
  k, s, pad = ins["kernel_size"], ins["strides"], ins["padding"]
  if ins["binary_weights"] and ins["binary_acts"]:
    a_sign, a_mask = pack_activations(x, k, s, pad)
    n, ho, wo, nw = a_sign.shape
    dot = popcount_dot(a_sign.reshape(-1, nw), a_mask.reshape(-1, nw), p["sign"],
                       p["nonzero"] if ins["has_zeros"] else None)
    y = dot.astype(jnp.float32) * scale_from_exponent(p["exp"])
    return y.reshape(n, ho, wo, -1)
  # Float convolution (float layers, 1w32a weight-only layers, 32w1a layers): the
  # exact lax call of BinaryConv.__call__, on the same kernel values.
  kernel = _unpacked_kernel(ins, p) if ins["binary_weights"] else p["kernel"]
  if ins["binary_acts"]:
    x = jnp.sign(x)
  return jax.lax.conv_general_dilated(
      x.astype(jnp.float32), kernel.astype(jnp.float32), window_strides=(s, s),
      padding=((pad, pad), (pad, pad)), dimension_numbers=_DIMS)


def _bn(ins, p, x):
  del ins
  return (x.astype(jnp.float32) - p["mean"]) * p["mul"] + p["bias"]


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


@functools.partial(jax.jit, static_argnums=(0, 1))
def _apply_jit(op: str, attrs: tuple, p: dict[str, jax.Array], *xs: jax.Array):
  # One compilation per (op, attributes, shapes), shared by all layers and models.
  return _OPS[op](dict(attrs), p, *xs)


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
    if ins["op"] not in _OPS:
      raise ValueError(f"unknown op {ins['op']!r} in program")
    xs = [regs[r] for r in ins["inputs"]]
    if jit_layers:
      attrs = tuple(sorted((k, v) for k, v in ins.items() if k not in _NOT_ATTRS))
      regs[ins["out"]] = _apply_jit(ins["op"], attrs, p, *xs)
    else:
      regs[ins["out"]] = _OPS[ins["op"]](ins, p, *xs)
  return regs[output]


MODES = ("program", "layers")


def infer(packed: PackedModel, images: jax.Array | np.ndarray, *,
          mode: str = "program") -> jax.Array:
  """Logits ``(N, classes)`` float32 of NHWC ``images`` (normalized floats).

  Equals ``model.eval()(images)`` of the packed model up to float rounding of the
  float layers after the last binarization.

  Args:
    packed: from :func:`~irnet_jax.export.pack` or :func:`~irnet_jax.export.load`.
    images: ``(N, H, W, C)``.
    mode: "program" jits the whole network as one XLA computation (fastest to
      run; XLA CPU takes tens of seconds to compile a ResNet) and caches it on
      ``packed`` (one compilation per input shape). "layers" jits each
      instruction separately, one compilation per distinct (op, attributes,
      shapes), shared across layers and models (compiles in seconds; runs slower,
      with one dispatch per instruction and no cross-layer fusion).
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
    cache["fn"] = jax.jit(functools.partial(run_program, packed.program, packed.output))
  return cache["fn"](cache["params"], images)
