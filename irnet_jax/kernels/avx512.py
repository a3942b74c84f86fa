"""Backend "avx512": the 1w1a convolutions on hand-written XNOR/popcount CPU kernels.

Supports: binary convolutions (binarized inputs and a kernel in ``{0, +-s_o}``, one
magnitude per output channel, as Libra-PB and plain sign produce) in float32 whose
input and output channel counts are multiples of 16 (:func:`handles`, decided from
static shapes and dtypes). Every other convolution of a model (the float stem and
shortcuts, 1w32a layers, other channel counts or dtypes) runs as in
:mod:`~irnet_jax.kernels.xla_cpu`. Runs on one CPU device with AVX-512 (see
:mod:`~irnet_jax.kernels.build`); the kernels are opaque custom calls that XLA's SPMD
partitioner cannot split, so a multi-device mesh uses an XLA backend instead.

The forward is exact (``s_o`` times an integer: bit-identical to the float conv of the
signs); the backward computes both gradients in one pass over the images (float32
sums in another order than XLA's, ~1e-6 relative) and applies the estimator's
gradient of the sign in JAX. The model's residual stream is materialized once
(:func:`materialize`).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from irnet_jax import ops
from irnet_jax.kernels import build, xla_cpu

NAME = "avx512"
PLATFORMS = ("cpu",)
MULTI_DEVICE = False
_TARGETS = ("irnet_binary_conv_fwd", "irnet_binary_conv_bwd", "irnet_materialize")


@functools.cache
def _registered() -> bool:
  lib = build.load()
  if lib is None:
    return False
  for name in _TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                platform="cpu")
  return True


def unavailable() -> str | None:
  """Why the kernels cannot run in this process (compiling them on first call), or None."""
  if _registered():
    return None
  return "the CPU kernels could not be built or loaded (see the warning above)"


def _check() -> None:
  if not _registered():
    raise RuntimeError("irnet_jax CPU kernels are unavailable here (see the warning "
                       "logged by irnet_jax.kernels.build); build the model with "
                       "conv_impl='auto' or 'xla_cpu'")


def handles(x: jax.Array, kernel: jax.Array, *, estimator: str | None,
            binary_kernel: bool, dtype=None) -> bool:
  """Whether a layer's convolution runs on the kernels (static shapes and dtypes only)."""
  return (estimator is not None and binary_kernel
          and (dtype is None or jnp.dtype(dtype) == jnp.float32)
          and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
          and x.ndim == 4 and kernel.ndim == 4 and kernel.shape[2] == x.shape[-1]
          and x.shape[-1] % 16 == 0 and kernel.shape[-1] % 16 == 0)


def conv(x: jax.Array, kernel: jax.Array, strides: int = 1, padding: int = 0, *,
         estimator: str | None = None, ede: ops.EDE | None = None,
         binary_kernel: bool = False, dtype=None) -> jax.Array:
  """The backend interface (see :mod:`irnet_jax.kernels`): the kernels where
  :func:`handles` says so, :func:`xla_cpu.conv` otherwise."""
  if handles(x, kernel, estimator=estimator, binary_kernel=binary_kernel, dtype=dtype):
    return binary_conv(x, kernel, ede, strides, padding, estimator)
  return xla_cpu.conv(x, kernel, strides, padding, estimator=estimator, ede=ede,
                      binary_kernel=binary_kernel, dtype=dtype)


def residual(x: jax.Array) -> jax.Array:
  """A residual stream that later blocks read: materialized once (float32)."""
  return materialize(x) if x.dtype == jnp.float32 else x


# ------------------------------------------------------------------ the op


def binary_conv(x: jax.Array, kernel_b: jax.Array, ede: ops.EDE | None = None,
                strides: int = 1, padding: int = 0, estimator: str = "ede") -> jax.Array:
  """``conv2d(binarize(x, estimator, ede), kernel_b)`` on the kernels.

  ``x``: (N, H, W, C) float32, the input *before* the sign. ``kernel_b``: (KH, KW, C,
  K) float32 in {0, +-s_o}. Values equal the float conv of the signs exactly; the
  gradient w.r.t. ``x`` is the estimator's, w.r.t. the kernel the float conv's.
  """
  ede = ops.DEFAULT_EDE if ede is None else ede
  return _binary_conv(x, kernel_b, ops.EDE(*map(jnp.asarray, ede)), strides, padding,
                      estimator)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _binary_conv(x, kernel_b, ede, strides, padding, estimator):
  del ede, estimator  # backward only
  return forward(x, kernel_b, strides, padding)


def _bc_fwd(x, kernel_b, ede, strides, padding, estimator):
  # The residual is x itself: the forward call already needs it materialized.
  return _binary_conv(x, kernel_b, ede, strides, padding, estimator), (x, kernel_b, ede)


def _bc_bwd(strides, padding, estimator, res, g):
  x, kernel_b, ede = res
  g_sign, g_kernel = gradients(x, kernel_b, g, strides, padding)
  _, sign_vjp = jax.vjp(lambda a: ops.binarize(a, estimator, ede), x)
  # (t, k) only shape the backward; like ede_sign, they get no gradient.
  return sign_vjp(g_sign)[0], g_kernel, jax.tree.map(jnp.zeros_like, ede)


_binary_conv.defvjp(_bc_fwd, _bc_bwd)


# ------------------------------------------------------------------ FFI calls


def _out_size(size: int, kernel: int, strides: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // strides + 1


def forward(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
  """Exact conv of ``sign(x)`` (x: N, H, W, C) with a kernel (KH, KW, C, K) -> (N, Ho, Wo, K).

  ``sign(0) = 0``; a NaN input makes the outputs whose window covers it NaN, as in
  XLA. Every nonzero kernel entry of output channel ``o`` must have the same magnitude.
  Operands the kernel cannot take (e.g. channels not multiples of 16) raise an error
  from the FFI handler when the computation runs.
  """
  _check()
  n, h, w, _ = x.shape
  kh, kw, _, k = kernel.shape
  shape = (n, _out_size(h, kh, strides, padding), _out_size(w, kw, strides, padding), k)
  return jax.ffi.ffi_call("irnet_binary_conv_fwd", jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(
      x, kernel, stride=np.int64(strides), padding=np.int64(padding))


def gradients(x: jax.Array, kernel: jax.Array, g: jax.Array, strides: int,
              padding: int) -> tuple[jax.Array, jax.Array]:
  """Both gradients of ``conv(sign(x), kernel)`` for the output cotangent ``g``.

  x: (N, H, W, C); kernel: (KH, KW, C, K); g: (N, Ho, Wo, K), all float32. Returns
  the gradient w.r.t. ``sign(x)`` (N, H, W, C) -- the caller applies the sign's
  estimator -- and w.r.t. the kernel (HWIO), from one pass over the images.
  """
  _check()
  shapes = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
            jax.ShapeDtypeStruct(kernel.shape, jnp.float32))
  return jax.ffi.ffi_call("irnet_binary_conv_bwd", shapes, vmap_method="sequential")(
      x, kernel, g, stride=np.int64(strides), padding=np.int64(padding))


@jax.custom_vjp
def materialize(x: jax.Array) -> jax.Array:
  """Identity that makes XLA compute ``x`` once, into a buffer its consumers read.

  XLA:CPU's loop fusion re-computes cheap elementwise producers inside each
  consumer; along a Bi-Real ResNet's residual stream (``h = hardtanh(bn(conv) + h)``)
  that re-computes the whole stream of every earlier block in every later one
  (quadratic in depth). ``jax.lax.optimization_barrier`` does not stop it on the
  CPU; an opaque custom call (a no-op: its output aliases its input) does. The
  gradient passes through unchanged (materializing it too was measured slower).
  """
  _check()
  return jax.ffi.ffi_call("irnet_materialize", jax.ShapeDtypeStruct(x.shape, x.dtype),
                          input_output_aliases={0: 0}, vmap_method="broadcast_all")(x)


def _materialize_fwd(x):
  return materialize(x), None


def _materialize_bwd(_, g):
  return (g,)


materialize.defvjp(_materialize_fwd, _materialize_bwd)
