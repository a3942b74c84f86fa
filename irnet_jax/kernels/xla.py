"""Backend "xla": XLA's own convolutions, nothing else.

Supports every convolution, dtype and platform (CPU, GPU, TPU), and any device mesh
(XLA's SPMD partitioner splits the batch). What ``"auto"`` picks on GPU and TPU.

With ``compute_dtype="bfloat16"`` both operands are bfloat16: for a binary convolution
they lose nothing (+-1 or 0 activations, +-2^k weights and their products are exact),
and XLA sums a bfloat16 convolution in float32 and rounds the result once (cuDNN and
the TPU's MXU accumulate in float32; XLA:CPU too, tests/test_kernels.py), so that one
rounding is its only error. Why not ``preferred_element_type=float32`` with a
float32 result: with it (and hand-written bf16 transposes for the backward pass) the
ImageNet ResNet-18 1w1a bf16 step ran at 9.9k img/s on an H200 on 2026-12-04, against
15.6k img/s for this plain bf16 convolution on 2026-11-29 (experiments/README.md).
"""
from __future__ import annotations

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


def conv(x: jax.Array, kernel: jax.Array, strides: int = 1, padding: int = 0, *,
         estimator: str | None = None, ede: ops.EDE | None = None,
         binary_kernel: bool = False, dtype=None) -> jax.Array:
  """The backend interface (see :mod:`irnet_jax.kernels`): :func:`ops.conv2d` of the
  operands in the compute dtype; output in the compute dtype."""
  del binary_kernel  # XLA convolves any kernel
  x, kernel = operands(x, kernel, estimator, ede, dtype)
  return ops.conv2d(x, kernel, strides, padding)


def residual(x: jax.Array) -> jax.Array:
  """Identity: XLA schedules the residual stream as it likes."""
  return x
