"""Convolution backends behind one seam, and the one place the platform enters.

A model is built with a resolved backend name (``models.create(..., conv_impl=...)``,
``config.model.conv_impl``); its layers call that backend and nothing below this
package reads the platform, the environment or a global at trace time.

Backends (one module each; each module's docstring says what it supports):

* ``"xla"`` (:mod:`.xla`) -- XLA's convolutions; every platform, dtype and mesh.
* ``"xla_cpu"`` (:mod:`.xla_cpu`) -- XLA's convolutions with binarized inputs saved
  as bit-planes for the backward pass (an XLA:CPU fusion remedy); CPU devices.
* ``"avx512"`` (:mod:`.avx512`) -- hand-written XNOR/popcount kernels (XLA FFI) for
  float32 1w1a layers with channels multiples of 16, the rest as ``"xla_cpu"``; one
  CPU device with AVX-512 and a C++ compiler (:mod:`.build`).

:func:`resolve` turns ``"auto"`` into one of them for the devices of a run: plain
``"xla"`` on GPU/TPU; on CPU ``"avx512"`` for a single device where the kernels load,
else ``"xla_cpu"`` (a multi-device mesh, another CPU, no compiler, or
``IRNET_JAX_CPU_KERNELS=0``). A backend module provides ``NAME``, ``PLATFORMS``
(None: all), ``MULTI_DEVICE`` (whether XLA can partition it over a mesh),
``unavailable()`` (None, or why not here), ``conv(x, kernel, strides, padding, *,
estimator, ede, binary_kernel, dtype)`` (x NHWC, kernel HWIO; ``estimator`` None for
float inputs, else the inputs are binarized with it) and ``residual(x)`` (a residual
stream that later blocks read; identity except where a backend must materialize it).
"""
from __future__ import annotations

import os
from types import ModuleType
from typing import Sequence

import jax

from irnet_jax.kernels import avx512, xla, xla_cpu

BACKENDS: dict[str, ModuleType] = {m.NAME: m for m in (xla, xla_cpu, avx512)}
CONV_IMPLS = ("auto", *BACKENDS)
KERNELS_ENV = "IRNET_JAX_CPU_KERNELS"  # "0": never use the native CPU kernels


def get(name: str) -> ModuleType:
  """The backend module of a resolved name (not ``"auto"``)."""
  if name not in BACKENDS:
    hint = " (resolve it first: kernels.resolve)" if name == "auto" else ""
    raise ValueError(f"unknown convolution backend {name!r}{hint}; expected one of "
                     f"{list(BACKENDS)}")
  return BACKENDS[name]


def _why_not(backend: ModuleType, devices: Sequence[jax.Device]) -> str | None:
  platforms = sorted({d.platform for d in devices})
  if backend.PLATFORMS is not None and not set(platforms) <= set(backend.PLATFORMS):
    return f"it runs on {'/'.join(backend.PLATFORMS)} devices, this run has {platforms}"
  if len(devices) > 1 and not backend.MULTI_DEVICE:
    return (f"its custom calls are opaque to XLA's partitioner, which would run them on "
            f"the whole batch on each of the {len(devices)} devices")
  if backend is avx512 and os.environ.get(KERNELS_ENV, "1") == "0":
    return f"{KERNELS_ENV}=0 turns the CPU kernels off"
  return backend.unavailable()


def resolve(conv_impl: str = "auto", devices: Sequence[jax.Device] | None = None) -> str:
  """The backend name a model uses on ``devices`` (default: JAX's default device).

  ``"auto"`` picks as the module docstring says (loading the CPU kernels, compiling
  them on first use, when they are a candidate). An explicit name is returned if it
  can run on ``devices``; otherwise a ValueError says why and what to use instead.
  """
  devices = list(devices) if devices else jax.devices()[:1]
  if conv_impl == "auto":
    if {d.platform for d in devices} != {"cpu"}:
      return xla.NAME
    return avx512.NAME if _why_not(avx512, devices) is None else xla_cpu.NAME
  if conv_impl not in BACKENDS:
    raise ValueError(f"conv_impl={conv_impl!r} is not valid; choose one of "
                     f"{list(CONV_IMPLS)}")
  why = _why_not(BACKENDS[conv_impl], devices)
  if why is not None:
    raise ValueError(f"conv_impl={conv_impl!r} cannot run here: {why}. Use 'auto' (it "
                     "picks the fastest backend that can) or 'xla'.")
  return conv_impl
