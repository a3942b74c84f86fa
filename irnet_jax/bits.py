"""The library's one bit layout for binary tensors: uint32 words, LSB first.

Every packed binary tensor that leaves a function -- the weights and activations of
an exported model (:mod:`irnet_jax.export`) and the saved residual of the XLA:CPU
convolution backend (:mod:`irnet_jax.kernels.xla_cpu`, via :func:`pack_ternary`) --
uses this layout:

* Bits run along the **last axis** of the unpacked tensor: for activations (NHWC)
  the channels; for an exported kernel, the reduction axis of the HWIO kernel
  flattened to ``K = kh * kw * in`` (element ``k = (i * kw + j) * in + c`` for tap
  ``(i, j)`` and input channel ``c``), with the output channel as the leading axis.
* Element ``k`` lives in **uint32 word** ``k // 32`` at bit ``k % 32`` (least
  significant bit first); ``ceil(K / 32)`` words, and the unused high bits of the
  last word are 0. Viewed as bytes on a little-endian host this is numpy's
  ``packbits(..., bitorder="little")``.
* A {-1, 0, +1} (ternary) tensor is two such planes: **sign** (bit set where the value
  is negative) and **nonzero** (bit set where it is not 0). ``sign(0) = 0`` (as in
  ``torch.sign``) is a value that one bit cannot hold; the nonzero plane holds it,
  and the sign plane is a subset of it. A dot product of two ternary vectors is then
  ``popcount(m) - 2 * popcount((sign_a XOR sign_b) AND m)`` with
  ``m = nonzero_a AND nonzero_b``.
* NaN (``sign(NaN)`` is NaN in jnp and torch) is the one combination a ternary value
  never takes: sign bit set, nonzero bit clear. :func:`unpack_ternary` gives NaN back,
  so a backward pass that saved its input this way propagates NaN exactly as the float
  computation would; a popcount dot product ignores it (``m`` is clear), which is why
  the exporter refuses non-finite weights before packing.

Why uint32: it is the widest word that ``jax.lax.population_count`` and shifts run
on without ``jax_enable_x64``, and XLA vectorizes elementwise uint32 ops well.

The one other packing in the library is private and transient: the AVX-512 kernel
(``irnet_jax/kernels/csrc/binary_conv.cc``) packs each call's float operands itself, channels
LSB-first (the same bit order) in 16-bit chunks -- one AVX-512 compare mask per 16
float32 -- and reads them as unaligned 64-bit words, as ``pos``/``neg`` planes (+1, -1)
whose AND/OR fit its agree/disagree count. Those planes live only inside one call
(they are built from float tensors and never stored or returned), so they are an
implementation detail of the kernel, free to follow the vector instructions.

Pure ``jnp``: works on concrete and traced arrays.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

WORD_BITS = 32


def num_words(k: int) -> int:
  """uint32 words holding ``k`` bits."""
  return -(-k // WORD_BITS)


def pack_bits(bits: jax.Array) -> jax.Array:
  """Packs booleans along the last axis: ``(..., K) -> (..., ceil(K/32))`` uint32."""
  bits = jnp.asarray(bits)
  k = bits.shape[-1]
  nw = num_words(k)
  pad = [(0, 0)] * (bits.ndim - 1) + [(0, nw * WORD_BITS - k)]
  b = jnp.pad(bits, pad).reshape(*bits.shape[:-1], nw, WORD_BITS).astype(jnp.uint32)
  # Distinct bits: the sum is a bitwise OR and cannot carry.
  return jnp.sum(b << jnp.arange(WORD_BITS, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)


def unpack_bits(words: jax.Array, k: int) -> jax.Array:
  """Inverse of :func:`pack_bits`: ``(..., n_words)`` uint32 -> ``(..., k)`` bool."""
  words = jnp.asarray(words, jnp.uint32)
  bits = (words[..., None] >> jnp.arange(WORD_BITS, dtype=jnp.uint32)) & jnp.uint32(1)
  return bits.reshape(*words.shape[:-1], -1)[..., :k].astype(bool)


def pack_ternary(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """{-1, 0, +1} (or NaN) values ``(..., C)`` -> (sign, nonzero) planes ``(..., ceil(C/32))``.

  NaN is stored as sign set, nonzero clear (see the module docstring).
  """
  # ``~(x >= 0)`` is true for negatives and NaN; ``x != 0`` would be true for NaN.
  return pack_bits(~(x >= 0)), pack_bits((x < 0) | (x > 0))


def unpack_ternary(planes: tuple[jax.Array, jax.Array], k: int,
                   dtype: jnp.dtype) -> jax.Array:
  """Inverse of :func:`pack_ternary`: ``(..., ceil(C/32))`` planes -> ``(..., k)`` values."""
  sign, nonzero = (unpack_bits(p, k) for p in planes)
  value = nonzero.astype(dtype) - 2 * sign.astype(dtype)
  return jnp.where(sign & ~nonzero, jnp.asarray(jnp.nan, dtype), value)
