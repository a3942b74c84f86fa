"""Backend "xla_cpu": XLA's convolutions, with the binarized input of each binary
convolution saved for the backward pass as two bit-planes.

Supports everything :mod:`~irnet_jax.kernels.xla` does (same values and gradients,
any mesh), on CPU devices only: the packing is a remedy for XLA:CPU's fusion pass and
was measured there only. What ``"auto"`` picks on a CPU without the AVX-512 kernels,
or on a multi-device CPU mesh.

Why: XLA:CPU's loop fusion recomputes the whole elementwise chain that produced a
binarized input (BN, residual adds, hardtanh, sign of every earlier Bi-Real block)
inside the transpose that feeds each weight-gradient convolution; a ResNet-20 1w1a
training step took 2145 ms without this, 545 ms with it, on a 2-core CPU. Packing is
a reduction, which XLA does not fuse into its consumers, so the chain is computed
once; 2 bits per activation are kept instead of 32, as the sign and nonzero planes of
the library's bit layout (:mod:`irnet_jax.bits`; the same ResNet-20 step costs the
same CPU time with these uint32 words as with the uint8 planes used before: 1448 vs
1481 ms median, 8 interleaved steps each, busy 2-core machine).
"""
from __future__ import annotations

import functools

import jax

from irnet_jax import ops
from irnet_jax.bits import pack_ternary, unpack_ternary
from irnet_jax.kernels import xla

NAME = "xla_cpu"
PLATFORMS = ("cpu",)
MULTI_DEVICE = True


def unavailable() -> str | None:
  """Always available (on CPU devices)."""
  return None


def conv(x: jax.Array, kernel: jax.Array, strides: int = 1, padding: int = 0, *,
         estimator: str | None = None, ede: ops.EDE | None = None,
         binary_kernel: bool = False, dtype=None) -> jax.Array:
  """The backend interface (see :mod:`irnet_jax.kernels`): :func:`sign_input_conv`
  for binarized inputs, :func:`ops.conv2d` otherwise."""
  del binary_kernel
  x, kernel = xla.operands(x, kernel, estimator, ede, dtype)
  if estimator is None:
    return ops.conv2d(x, kernel, strides, padding)
  return sign_input_conv(x, kernel, strides, padding)


residual = xla.residual


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def sign_input_conv(x_b: jax.Array, kernel: jax.Array, strides: int = 1,
                    padding: int = 0) -> jax.Array:
  """:func:`ops.conv2d` of an input known to be in {-1, 0, +1} (e.g. ``binarize(x)``).

  Values and gradients are exactly those of :func:`ops.conv2d`; only what the backward
  pass keeps differs: the input as two bit-planes (see the module docstring).
  """
  return ops.conv2d(x_b, kernel, strides, padding)


def _sic_fwd(x_b, kernel, strides, padding):
  return (ops.conv2d(x_b, kernel, strides, padding),
          (pack_ternary(x_b), kernel, x_b.shape[-1]))


def _sic_bwd(strides, padding, res, g):
  planes, kernel, channels = res
  x_b = unpack_ternary(planes, channels, kernel.dtype)
  _, vjp = jax.vjp(lambda a, k: ops.conv2d(a, k, strides, padding), x_b, kernel)
  return vjp(g)


sign_input_conv.defvjp(_sic_fwd, _sic_bwd)
