"""Backend "xla": XLA's own convolutions, nothing else.

Supports every convolution, dtype and platform (CPU, GPU, TPU), and any device mesh
(XLA's SPMD partitioner splits the batch). What ``"auto"`` picks on GPU and TPU.

Operands narrower than float32 (``compute_dtype="bfloat16"``) are convolved by
:func:`narrow_conv`: narrow operands, products summed in float32, the result rounded
once to the operands' dtype, in the forward and the backward pass. For a binary
convolution the operands lose nothing in bfloat16 (+-1 or 0 activations, +-2^k weights
and their products are exact), so that one rounding is its only error. float32 and
float64 operands are convolved as they are (:func:`ops.conv2d`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from irnet_jax import ops

NAME = "xla"
PLATFORMS = None  # every platform
MULTI_DEVICE = True


def unavailable() -> str | None:
  """Always available."""
  return None


def operands(x: jax.Array, kernel: jax.Array, estimator: str | None, ede: ops.EDE | None,
             dtype) -> tuple[jax.Array, jax.Array]:
  """``(binarize(x) if estimator else x, kernel)``, both cast to the compute ``dtype``
  (None: the promoted dtype). The sign is taken before the cast, in ``x``'s dtype."""
  if estimator is not None:
    x = ops.binarize(x, estimator, ede)
  dtype = dtype or jnp.result_type(x, kernel)
  return x.astype(dtype), kernel.astype(dtype)


def accumulation_dtype(dtype) -> jnp.dtype | None:
  """The dtype a convolution of ``dtype`` operands sums in: float32 for floats
  narrower than float32 (bfloat16, float16), None (their own) for the others."""
  dtype = jnp.dtype(dtype)
  if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4:
    return jnp.dtype(jnp.float32)
  return None


def conv(x: jax.Array, kernel: jax.Array, strides: int = 1, padding: int = 0, *,
         estimator: str | None = None, ede: ops.EDE | None = None,
         binary_kernel: bool = False, dtype=None) -> jax.Array:
  """The backend interface (see :mod:`irnet_jax.kernels`): :func:`ops.conv2d`, or
  :func:`narrow_conv` for operands narrower than float32. Output in the compute dtype."""
  del binary_kernel  # XLA convolves any kernel
  x, kernel = operands(x, kernel, estimator, ede, dtype)
  if accumulation_dtype(x.dtype) is None:
    return ops.conv2d(x, kernel, strides, padding)
  return narrow_conv(x, kernel, strides, padding)


def residual(x: jax.Array) -> jax.Array:
  """Identity: XLA schedules the residual stream as it likes."""
  return x


# ------------------------------------------------------------------ narrow operands


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def narrow_conv(x: jax.Array, kernel: jax.Array, strides: int = 1,
                padding: int = 0) -> jax.Array:
  """:func:`ops.conv2d` of bfloat16 (or float16) operands, x NHWC and kernel HWIO of
  the same dtype: products summed in float32, the result rounded once to that dtype.

  The gradients are computed the same way (:func:`input_gradient`,
  :func:`kernel_gradient`: narrow operands, float32 sums, one rounding each). Why a
  custom VJP: JAX transposes a convolution with ``preferred_element_type=float32`` by
  upcasting its operands and the cotangent to float32, which would make every
  backward convolution a float32 one.
  """
  if x.dtype != kernel.dtype or accumulation_dtype(x.dtype) is None:
    raise TypeError(f"narrow_conv takes two operands of one dtype narrower than float32, "
                    f"got {x.dtype} and {kernel.dtype}")
  return ops.conv2d(x, kernel, strides, padding,
                    preferred_element_type=jnp.float32).astype(x.dtype)


def _narrow_fwd(x, kernel, strides, padding):
  return narrow_conv(x, kernel, strides, padding), (x, kernel)


def _narrow_bwd(strides, padding, res, g):
  x, kernel = res
  # The cotangent of a narrow output already has the narrow dtype; no rounding here.
  g = g.astype(x.dtype)
  return (input_gradient(g, kernel, x.shape, strides, padding).astype(x.dtype),
          kernel_gradient(x, g, kernel.shape, strides, padding).astype(kernel.dtype))


narrow_conv.defvjp(_narrow_fwd, _narrow_bwd)


def input_gradient(g: jax.Array, kernel: jax.Array, x_shape: tuple[int, ...],
                   strides: int, padding: int) -> jax.Array:
  """Gradient of :func:`ops.conv2d` w.r.t. its input, float32 sums: (N, H, W, C).

  g: the output cotangent (N, Ho, Wo, K); kernel: (KH, KW, C, K); x_shape: the
  input's NHWC shape. The transposed convolution: g dilated by the stride, convolved
  with the spatially flipped kernel, its I/O roles swapped (as JAX's own transpose).
  """
  pads = []
  for size, window, out in ((x_shape[1], kernel.shape[0], g.shape[1]),
                            (x_shape[2], kernel.shape[1], g.shape[2])):
    before = window - 1 - padding
    # Rows of x past the last window (when (size + 2p - window) % strides != 0) get
    # no gradient: the high padding makes the output exactly `size` long.
    pads.append((before, size - 1 + padding - (out - 1) * strides))
  return jax.lax.conv_general_dilated(
      g, jnp.flip(kernel, (0, 1)), window_strides=(1, 1), padding=pads,
      lhs_dilation=(strides, strides), dimension_numbers=("NHWC", "HWOI", "NHWC"),
      preferred_element_type=jnp.float32)


def kernel_gradient(x: jax.Array, g: jax.Array, kernel_shape: tuple[int, ...],
                    strides: int, padding: int) -> jax.Array:
  """Gradient of :func:`ops.conv2d` w.r.t. its kernel, float32 sums: (KH, KW, C, K).

  x: the input (N, H, W, C); g: the output cotangent (N, Ho, Wo, K). A convolution of
  x (C as the batch, N summed) with g as the window, dilated by the stride.
  """
  pads = []
  for size, window, out in ((x.shape[1], kernel_shape[0], g.shape[1]),
                            (x.shape[2], kernel_shape[1], g.shape[2])):
    # The high side ends at the last window's last tap (negative: crops unused rows).
    pads.append((padding, window + (out - 1) * strides - size - padding))
  return jax.lax.conv_general_dilated(
      x, g, window_strides=(1, 1), padding=pads, rhs_dilation=(strides, strides),
      dimension_numbers=("CHWN", "IHWO", "HWNC"), preferred_element_type=jnp.float32)
