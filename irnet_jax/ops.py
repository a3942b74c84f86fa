"""Pure binarization functions of IR-Net (Qin et al., CVPR 2020).

Everything here is a plain ``jnp`` function: no Flax, no state, jit- and
grad-friendly, dtype-preserving (float64 stays float64 under ``jax_enable_x64``).

* :func:`ede_sign` -- ``sign`` whose backward pass is the Error Decay Estimator
  ``g * k * t * (1 - tanh(t x)^2)`` (IR-Net Eq. 10/11).
* :func:`ede_schedule` -- the t/k schedule (Eq. 12) as a function of training progress.
* :func:`libra_pb` -- Libra Parameter Binarization of a kernel (Eq. 7-9).
* :func:`ste_sign`, :func:`approx_sign` -- baseline estimators for ablations.
* :func:`sign_input_conv` -- a convolution of binarized inputs whose backward pass
  keeps them as packed bits.
* :func:`binary_conv` -- the convolution of a 1w1a layer on hand-written x86 CPU
  kernels (exact XNOR/popcount forward, see ``cpu_kernels``).

Semantics follow the official PyTorch code (htqin/IR-Net) where it differs from
the paper:

* ``sign(0) == 0`` exactly like ``torch.sign``: a zero input contributes nothing to
  a binary convolution. Deployment code (``irnet_jax.export``) reproduces this.
* The Libra-PB scale ``2^round(log2(mean|w_std|))`` is computed on the
  *standardized* weights and carries no gradient (``.detach()`` upstream).
* The standard deviation is the unbiased one (ddof=1, like ``torch.std``), with no
  epsilon: a constant kernel channel produces NaN, as in the official code.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from irnet_jax import cpu_kernels

ESTIMATORS = ("ede", "ste", "approx_sign")
WEIGHT_QUANTIZERS = ("libra_pb", "sign", "none")


class EDE(NamedTuple):
  """Error Decay Estimator parameters; a pytree of two scalars.

  ``t`` controls the sharpness of ``tanh(t x)``; ``k`` rescales the gradient so
  that early in training (small t) updates are not vanishingly small.
  """
  t: jax.Array | float
  k: jax.Array | float


# Used when a binary layer is called without an EDE (e.g. in eval mode, where only
# the forward pass matters). Its backward is d/dx tanh(x).
DEFAULT_EDE = EDE(t=1.0, k=1.0)


def ede_schedule(progress: jax.Array | float, t_min: float = 0.1,
                 t_max: float = 10.0) -> EDE:
  """IR-Net Eq. 12: ``t = 10^(log10 t_min + (log10 t_max - log10 t_min) * progress)``.

  Args:
    progress: training progress in [0, 1) (epoch / num_epochs in the official
      CIFAR code, iteration / total in the ImageNet code). May be traced.
    t_min, t_max: the paper uses 0.1 and 10; the official ResNet-20 1w1a trainer
      uses t_min = 1e-3.

  Returns:
    ``EDE(t, k)`` with ``k = max(1/t, 1)``, as float32 arrays (or the dtype of
    ``progress`` if it is a floating array).
  """
  progress = jnp.asarray(progress)
  if not jnp.issubdtype(progress.dtype, jnp.floating):
    progress = progress.astype(jnp.float32)
  lo, hi = math.log10(t_min), math.log10(t_max)
  t = jnp.power(jnp.asarray(10.0, progress.dtype), lo + (hi - lo) * progress)
  k = jnp.maximum(1.0 / t, 1.0)
  return EDE(t=t, k=k)


@jax.custom_vjp
def ede_sign(x: jax.Array, t: jax.Array | float, k: jax.Array | float) -> jax.Array:
  """Forward ``sign(x)`` (sign(0) = 0); backward ``g * k * t * (1 - tanh(t x)^2)``.

  ``t`` and ``k`` are ordinary (traceable) arguments, so changing them between
  steps never recompiles. They receive zero cotangents.
  """
  return jnp.sign(x)


def _ede_fwd(x, t, k):
  return jnp.sign(x), (x, t, k)


def _ede_bwd(res, g):
  x, t, k = res
  t_ = jnp.asarray(t, x.dtype)
  k_ = jnp.asarray(k, x.dtype)
  grad = g * (k_ * t_ * (1.0 - jnp.square(jnp.tanh(t_ * x))))
  return grad, jnp.zeros_like(jnp.asarray(t)), jnp.zeros_like(jnp.asarray(k))


ede_sign.defvjp(_ede_fwd, _ede_bwd)


@jax.custom_vjp
def ste_sign(x: jax.Array) -> jax.Array:
  """Sign with the clipped straight-through estimator: ``g * (|x| <= 1)``."""
  return jnp.sign(x)


def _ste_fwd(x):
  return jnp.sign(x), x


def _ste_bwd(x, g):
  return (jnp.where(jnp.abs(x) <= 1.0, g, jnp.zeros_like(g)),)


ste_sign.defvjp(_ste_fwd, _ste_bwd)


@jax.custom_vjp
def approx_sign(x: jax.Array) -> jax.Array:
  """Sign with Bi-Real Net's piecewise-quadratic estimator: ``g * max(2 - 2|x|, 0)``."""
  return jnp.sign(x)


def _approx_fwd(x):
  return jnp.sign(x), x


def _approx_bwd(x, g):
  return (g * jnp.maximum(2.0 - 2.0 * jnp.abs(x), 0.0).astype(g.dtype),)


approx_sign.defvjp(_approx_fwd, _approx_bwd)


def binarize(x: jax.Array, estimator: str = "ede", ede: EDE | None = None) -> jax.Array:
  """``sign(x)`` with the backward pass of ``estimator`` (one of :data:`ESTIMATORS`).

  ``ede`` is only used by the "ede" estimator; ``None`` means :data:`DEFAULT_EDE`.
  """
  if estimator == "ede":
    t, k = DEFAULT_EDE if ede is None else ede
    return ede_sign(x, t, k)
  if estimator == "ste":
    return ste_sign(x)
  if estimator == "approx_sign":
    return approx_sign(x)
  raise ValueError(f"unknown estimator {estimator!r}; expected one of {ESTIMATORS}")


def _reduce_axes(kernel: jax.Array) -> tuple[int, ...]:
  # Flax layout: the output channel is the last axis (HWIO convs, (in, out) dense).
  return tuple(range(kernel.ndim - 1))


def standardize(kernel: jax.Array) -> jax.Array:
  """Per output channel (last axis): subtract the mean, divide by the unbiased std.

  Reduces over all other axes (H, W, I for an HWIO kernel). Gradients flow through
  both the mean and the std, as in the official code.
  """
  axes = _reduce_axes(kernel)
  centered = kernel - jnp.mean(kernel, axis=axes, keepdims=True)
  return centered / jnp.std(centered, axis=axes, keepdims=True, ddof=1)


def libra_scale(w_std: jax.Array) -> jax.Array:
  """Power-of-two per-channel scale ``2^round(log2(mean|w_std|))``, without gradient.

  Shape: ``(1, ..., 1, out)``, broadcastable against the kernel. Computed as
  ``log(.) / log(2)`` like the official code so that ties round identically.
  """
  mean_abs = jnp.mean(jnp.abs(w_std), axis=_reduce_axes(w_std), keepdims=True)
  exponent = jnp.round(jnp.log(mean_abs) / math.log(2.0))
  return jax.lax.stop_gradient(jnp.exp2(exponent).astype(w_std.dtype))


def libra_pb(kernel: jax.Array, ede: EDE | None = None,
             estimator: str = "ede") -> jax.Array:
  """Libra-PB: ``sign(standardize(kernel)) * 2^round(log2(mean|standardized|))``.

  Args:
    kernel: latent float weights, Flax layout ``(..., in, out)`` (HWIO for convs).
    ede: (t, k) of the Error Decay Estimator for the sign's backward pass.
    estimator: backward of the sign, one of :data:`ESTIMATORS`.

  Returns:
    The quantized kernel, same shape and dtype: ``+-scale`` per output channel
    (0 where a standardized weight is exactly 0).
  """
  w_std = standardize(kernel)
  return binarize(w_std, estimator, ede) * libra_scale(w_std)


def quantize_weights(kernel: jax.Array, quantizer: str = "libra_pb",
                     estimator: str = "ede", ede: EDE | None = None) -> jax.Array:
  """Weight quantizer dispatch: "libra_pb", "sign" (plain sign, no scale) or "none"."""
  if quantizer == "libra_pb":
    return libra_pb(kernel, ede, estimator)
  if quantizer == "sign":
    return binarize(kernel, estimator, ede)
  if quantizer == "none":
    return kernel
  raise ValueError(
      f"unknown weight quantizer {quantizer!r}; expected one of {WEIGHT_QUANTIZERS}")


def hardtanh(x: jax.Array) -> jax.Array:
  """``clip(x, -1, 1)``, the activation IR-Net uses instead of ReLU."""
  return jnp.clip(x, -1.0, 1.0)


ACTIVATIONS = {"hardtanh": hardtanh, "relu": jax.nn.relu}


def activation(name: str):
  """"hardtanh" (1w1a networks) or "relu" (the official 1w32a networks)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# ----------------------------------------------------------------------------------
# Convolution of binarized inputs, with a bit-packed residual.


def conv2d(x: jax.Array, kernel: jax.Array, strides: int = 1, padding: int = 0) -> jax.Array:
  """``F.conv2d`` semantics on NHWC inputs and HWIO kernels, symmetric zero padding."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(strides, strides), padding=((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def pack_ternary(b: jax.Array) -> tuple[jax.Array, jax.Array]:
  """{-1, 0, +1} values ``(..., C)`` -> two uint8 bit-planes ``(..., ceil(C/8))``.

  Plane 0 marks +1, plane 1 marks -1 (zeros -- sign(0) -- are in neither), bit ``i``
  of byte ``j`` is channel ``8 j + i``.
  """
  pad = (-b.shape[-1]) % 8

  def plane(mask):
    m = jnp.pad(mask.astype(jnp.uint8), ((0, 0),) * (b.ndim - 1) + ((0, pad),))
    m = m.reshape(*m.shape[:-1], -1, 8)
    return jnp.sum(m << jnp.arange(8, dtype=jnp.uint8), axis=-1, dtype=jnp.uint8)

  return plane(b > 0), plane(b < 0)


def unpack_ternary(planes: tuple[jax.Array, jax.Array], channels: int,
                   dtype: jnp.dtype) -> jax.Array:
  """Inverse of :func:`pack_ternary`: ``(..., ceil(C/8))`` planes -> ``(..., C)`` values."""

  def bits(p):
    unpacked = (p[..., None] >> jnp.arange(8, dtype=jnp.uint8)) & 1
    return unpacked.reshape(*p.shape[:-1], -1)[..., :channels].astype(dtype)

  return bits(planes[0]) - bits(planes[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def sign_input_conv(x_b: jax.Array, kernel: jax.Array, strides: int = 1,
                    padding: int = 0) -> jax.Array:
  """:func:`conv2d` of an input known to be in {-1, 0, +1} (e.g. ``binarize(x)``).

  Values and gradients are exactly those of :func:`conv2d`; only what the backward
  pass keeps differs: the input is saved as two bit-planes (2 bits per activation
  instead of 32). Besides the memory, this matters for speed on XLA:CPU, whose
  fusion pass otherwise recomputes the whole elementwise chain that produced ``x_b``
  (BN, residual adds, hardtanh, sign of every earlier Bi-Real block) inside the
  transpose feeding each weight-gradient convolution (a ResNet-20 1w1a training step
  on XLA's convolutions took 2145 ms without this, 545 ms with it, on a 2-core CPU;
  the CPU-kernel path, :func:`binary_conv`, has its own remedy). Packing
  is a reduction, which XLA does not fuse into its consumers, so the chain is
  computed once.
  """
  return conv2d(x_b, kernel, strides, padding)


def _sic_fwd(x_b, kernel, strides, padding):
  return conv2d(x_b, kernel, strides, padding), (pack_ternary(x_b), kernel, x_b.shape[-1])


def _sic_bwd(strides, padding, res, g):
  planes, kernel, channels = res
  x_b = unpack_ternary(planes, channels, kernel.dtype)
  _, vjp = jax.vjp(lambda a, k: conv2d(a, k, strides, padding), x_b, kernel)
  return vjp(g)


sign_input_conv.defvjp(_sic_fwd, _sic_bwd)


# ----------------------------------------------------------------------------------
# Binary convolution of a 1w1a layer on the CPU kernels.


def binary_conv_supported(x: jax.Array, kernel_b: jax.Array) -> bool:
  """Whether :func:`binary_conv` can run these operands (decided at trace time).

  The kernels are registered for the CPU only: they are used when the computation
  runs on the CPU backend (the default device), in float32, with channel counts
  that are multiples of 16, on an x86 CPU with AVX-512 (:mod:`irnet_jax.cpu_kernels`).
  """
  return (jax.default_backend() == "cpu" and x.dtype == kernel_b.dtype == jnp.float32
          and cpu_kernels.supports(x.shape, kernel_b.shape, x.dtype))


def residual_stream(x: jax.Array) -> jax.Array:
  """Marks a tensor of a residual stream that later blocks read (identity).

  On the CPU-kernel path this is :func:`cpu_kernels.materialize`, which stops XLA
  from re-computing the stream inside every later block; elsewhere a no-op.
  """
  if jax.default_backend() == "cpu" and x.dtype == jnp.float32 and cpu_kernels.enabled():
    return cpu_kernels.materialize(x)
  return x


def binary_conv(x: jax.Array, kernel_b: jax.Array, ede: EDE | None = None,
                strides: int = 1, padding: int = 0, estimator: str = "ede") -> jax.Array:
  """``conv2d(binarize(x, estimator, ede), kernel_b)`` on the hand-written CPU kernels.

  ``x``: (N, H, W, C) float32, the input *before* the sign. ``kernel_b``: (KH, KW, C,
  K), {0, +-s_o} with one magnitude per output channel, as :func:`libra_pb`
  (power-of-two ``s_o``) and plain sign (``s_o = 1``) produce. The forward is an exact
  XNOR/popcount convolution (an integer times ``s_o``: bit-identical to the float
  conv); the backward uses hand-written gradient kernels (float32 sums in another
  order than XLA's, ~1e-6 relative) and ``estimator``'s gradient of the sign. Only
  for operands :func:`binary_conv_supported` accepts.
  """
  ede = DEFAULT_EDE if ede is None else ede
  return _binary_conv(x, kernel_b, EDE(*map(jnp.asarray, ede)), strides, padding, estimator)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _binary_conv(x, kernel_b, ede, strides, padding, estimator):
  del ede, estimator  # backward only
  return cpu_kernels.binary_conv(x, kernel_b, strides, padding)


def _bc_fwd(x, kernel_b, ede, strides, padding, estimator):
  # The residual is x itself: the forward call already needs it materialized.
  return _binary_conv(x, kernel_b, ede, strides, padding, estimator), (x, kernel_b, ede)


def _bc_bwd(strides, padding, estimator, res, g):
  x, kernel_b, ede = res
  g_sign, g_kernel = cpu_kernels.binary_conv_grads(x, kernel_b, g, strides, padding)
  _, sign_vjp = jax.vjp(lambda a: binarize(a, estimator, ede), x)
  # (t, k) only shape the backward; like ede_sign, they get no gradient.
  return sign_vjp(g_sign)[0], g_kernel, jax.tree.map(jnp.zeros_like, ede)


_binary_conv.defvjp(_bc_fwd, _bc_bwd)
