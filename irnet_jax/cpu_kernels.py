"""Hand-written CPU kernels for binary convolutions, compiled on first use.

``csrc/binary_conv.cc`` holds three XLA FFI handlers (see its header for why they are
hand-written): an exact XNOR/popcount forward of a conv whose input is in {-1, 0, +1}
and whose kernel is {0, +-s_o}, and the input / kernel gradients of a float conv.
This module compiles that file with the system C++ compiler into a per-user cache
(``$IRNET_JAX_CACHE`` or ``~/.cache/irnet_jax``; keyed by source, jaxlib version and
host), registers the handlers with XLA, and wraps them as ``jax.ffi`` calls.

Everything here is optional: :func:`available` is False -- and callers use XLA's own
convolutions -- when the compiler or the CPU features (AVX-512 F/DQ/BW/VL/VPOPCNTDQ) are
missing, or when ``IRNET_JAX_CPU_KERNELS=0`` is set. The wrappers take NHWC float32
activations and HWIO float32 kernels with channel counts that are multiples of 16
(:func:`supports` checks a call's shapes).
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

_SOURCE = pathlib.Path(__file__).parent / "csrc" / "binary_conv.cc"
_TARGETS = ("irnet_binary_conv_fwd", "irnet_binary_conv_bwd", "irnet_conv_dx", "irnet_conv_dw",
            "irnet_materialize")
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")


def _cache_dir() -> pathlib.Path:
  root = os.environ.get("IRNET_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "irnet_jax")
  return pathlib.Path(root)


def _compile() -> pathlib.Path:
  """Builds the shared library once per (source, jaxlib, host); returns its path."""
  source = _SOURCE.read_bytes()
  key = hashlib.sha256(source + repr((_FLAGS, jaxlib.__version__, platform.node(),
                                      platform.machine())).encode()).hexdigest()[:16]
  target = _cache_dir() / f"binary_conv_{key}.so"
  if target.exists():
    return target
  target.parent.mkdir(parents=True, exist_ok=True)
  compiler = os.environ.get("CXX", "c++")
  # Build into a temporary name and rename: concurrent processes never load a
  # half-written library.
  with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
    tmp_path = pathlib.Path(tmp.name)
  try:
    subprocess.run([compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o",
                    str(tmp_path)], check=True, capture_output=True, text=True)
    os.replace(tmp_path, target)
  finally:
    tmp_path.unlink(missing_ok=True)
  return target


@functools.cache
def _load() -> bool:
  """Compiles, loads and registers the kernels once per process; False if impossible."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    return False
  try:
    lib = ctypes.cdll.LoadLibrary(str(_compile()))
  except (OSError, subprocess.CalledProcessError) as e:
    detail = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
    logging.warning("irnet_jax: CPU binary-conv kernels unavailable, using XLA's "
                    "convolutions (%s)", detail[-1] if detail else e)
    return False
  if not lib.irnet_kernels_available():
    return False  # compiled without AVX-512 VPOPCNTDQ: the handlers are not built
  for name in _TARGETS:
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)),
                                platform="cpu")
  return True


def available() -> bool:
  """True when the kernels are compiled, supported by this CPU and registered.

  ``IRNET_JAX_CPU_KERNELS=0`` in the environment turns them off.
  """
  return os.environ.get("IRNET_JAX_CPU_KERNELS", "1") != "0" and _load()


_disabled = 0


@contextlib.contextmanager
def disabled():
  """Inside this block, code traced from then on uses XLA's convolutions instead.

  For comparisons and debugging; the choice is made at trace time, so a function
  jitted inside the block keeps XLA's convolutions.
  """
  global _disabled
  _disabled += 1
  try:
    yield
  finally:
    _disabled -= 1


def enabled() -> bool:
  """:func:`available` and not inside :func:`disabled`."""
  return not _disabled and available()


def supports(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
             dtype: jnp.dtype) -> bool:
  """Whether a conv of NHWC ``x_shape`` with HWIO ``kernel_shape`` can use the kernels."""
  return (dtype == jnp.float32 and len(x_shape) == 4 and len(kernel_shape) == 4
          and x_shape[-1] % 16 == 0 and kernel_shape[-1] % 16 == 0
          and kernel_shape[2] == x_shape[-1] and enabled())


def _out_size(size: int, kernel: int, strides: int, padding: int) -> int:
  return (size + 2 * padding - kernel) // strides + 1


def _check() -> None:
  if not available():
    raise RuntimeError("irnet_jax CPU kernels are unavailable here (no C++ compiler, no "
                       "AVX-512 VPOPCNTDQ, or IRNET_JAX_CPU_KERNELS=0); check "
                       "cpu_kernels.available() and use XLA's convolutions instead")


def _call(name: str, shape: tuple[int, ...], a: jax.Array, b: jax.Array, strides: int,
          padding: int, **attrs: int) -> jax.Array:
  _check()
  attrs = {k: np.int64(v) for k, v in attrs.items()}
  return jax.ffi.ffi_call(name, jax.ShapeDtypeStruct(shape, jnp.float32),
                          vmap_method="sequential")(
      a, b, stride=np.int64(strides), padding=np.int64(padding), **attrs)


def binary_conv(x: jax.Array, kernel: jax.Array, strides: int,
                padding: int) -> jax.Array:
  """Exact conv of ``sign(x)`` (x: N, H, W, C) with a kernel (KH, KW, C, K).

  ``sign(0) = 0``. Every nonzero kernel entry of output channel ``o`` must have the
  same magnitude (Libra-PB's power-of-two scale, or 1). Returns (N, Ho, Wo, K).
  """
  n, h, w, _ = x.shape
  kh, kw, _, k = kernel.shape
  shape = (n, _out_size(h, kh, strides, padding), _out_size(w, kw, strides, padding), k)
  return _call("irnet_binary_conv_fwd", shape, x, kernel, strides, padding)


def conv_input_grad(g: jax.Array, kernel: jax.Array, input_hw: tuple[int, int],
                    strides: int, padding: int) -> jax.Array:
  """Gradient w.r.t. the input of a conv: (N, Ho, Wo, K) -> (N, H, W, C)."""
  shape = (g.shape[0], *input_hw, kernel.shape[2])
  return _call("irnet_conv_dx", shape, g, kernel, strides, padding)


def conv_kernel_grad(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int],
                     strides: int, padding: int, sign_input: bool = False) -> jax.Array:
  """Gradient w.r.t. the kernel of a conv: input (N, H, W, C), g (N, Ho, Wo, K) -> HWIO.

  With ``sign_input`` the conv's input is ``sign(x)`` (computed inside the kernel).
  """
  shape = (*kernel_hw, x.shape[-1], g.shape[-1])
  return _call("irnet_conv_dw", shape, x, g, strides, padding, sign_input=sign_input)


def binary_conv_grads(x: jax.Array, kernel: jax.Array, g: jax.Array, strides: int,
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
  if not available():
    return x
  return jax.ffi.ffi_call("irnet_materialize", jax.ShapeDtypeStruct(x.shape, x.dtype),
                          input_output_aliases={0: 0}, vmap_method="broadcast_all")(x)


def _materialize_fwd(x):
  return materialize(x), None


def _materialize_bwd(_, g):
  return (g,)


materialize.defvjp(_materialize_fwd, _materialize_bwd)
