"""Backend "xla": XLA's own convolutions, nothing else.

Supports every convolution, dtype and platform (CPU, GPU, TPU), and any device mesh
(XLA's SPMD partitioner splits the batch). What ``"auto"`` picks on GPU and TPU.
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
  """The backend interface (see :mod:`irnet_jax.kernels`): :func:`ops.conv2d`."""
  del binary_kernel  # XLA convolves any kernel
  x, kernel = operands(x, kernel, estimator, ede, dtype)
  return ops.conv2d(x, kernel, strides, padding)


def residual(x: jax.Array) -> jax.Array:
  """Identity: XLA schedules the residual stream as it likes."""
  return x
