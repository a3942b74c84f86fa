"""Pure binarization functions of IR-Net (Qin et al., CVPR 2020).

Everything here is a plain ``jnp`` function: no Flax, no state, jit- and
grad-friendly, dtype-preserving (float64 stays float64 under ``jax_enable_x64``).

* :func:`ede_sign` -- ``sign`` whose backward pass is the Error Decay Estimator
  ``g * k * t * (1 - tanh(t x)^2)`` (IR-Net Eq. 10/11).
* :func:`ede_schedule` -- the t/k schedule (Eq. 12) as a function of training progress.
* :func:`libra_pb` -- Libra Parameter Binarization of a kernel (Eq. 7-9).
* :func:`ste_sign`, :func:`approx_sign` -- baseline estimators for ablations.
* :func:`mean_abs_sign` -- XNOR-Net / Bi-Real weights ``sign(w) * mean|w|`` per channel.
* :func:`rprelu` -- ReActNet's shifted PReLU.
* :func:`conv2d` -- ``F.conv2d`` on NHWC/HWIO. How a model's convolutions run (XLA,
  or the CPU kernels) is chosen by :mod:`irnet_jax.kernels`, not here.

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

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

ESTIMATORS = ("ede", "ste", "approx_sign")
WEIGHT_QUANTIZERS = ("libra_pb", "sign", "mean_abs", "mean_abs_detached", "none")


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


def _sign_with_backward(name: str, doc: str, backward):
  """``sign(x)`` (sign(0) = 0) whose backward pass is ``backward(x, g)``."""

  def sign(x: jax.Array) -> jax.Array:
    return jnp.sign(x)

  sign.__name__ = sign.__qualname__ = name
  sign.__doc__ = doc
  fn = jax.custom_vjp(sign)
  fn.defvjp(lambda x: (jnp.sign(x), x), lambda x, g: (backward(x, g),))
  return fn


ste_sign = _sign_with_backward(
    "ste_sign", "Sign with the clipped straight-through estimator: ``g * (|x| <= 1)``.",
    lambda x, g: jnp.where(jnp.abs(x) <= 1.0, g, jnp.zeros_like(g)))

approx_sign = _sign_with_backward(
    "approx_sign",
    "Sign with Bi-Real Net's piecewise-quadratic estimator: ``g * max(2 - 2|x|, 0)``.",
    lambda x, g: g * jnp.maximum(2.0 - 2.0 * jnp.abs(x), 0.0).astype(g.dtype))


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


def mean_abs_sign(kernel: jax.Array, estimator: str = "ste", ede: EDE | None = None,
                  detach_scale: bool = False) -> jax.Array:
  """``sign(w) * alpha`` with ``alpha = mean|w|`` per output channel (last axis).

  XNOR-Net (Rastegari et al., ECCV 2016, Eq. 4) keeps alpha's gradient, so with the
  straight-through sign ``dq/dw = 1/n + alpha * 1{|w| <= 1}`` (its Sec. 3.1). Bi-Real Net
  (Liu et al., ECCV 2018, "magnitude-aware gradient") and ReActNet detach alpha:
  ``detach_scale=True`` gives ``dq/dw = alpha * 1{|w| <= 1}`` -- as their official code
  does (``scaling_factor.detach()``).
  """
  return binarize(kernel, estimator, ede) * mean_abs_scale(kernel, detach_scale)


def mean_abs_scale(kernel: jax.Array, detach: bool = False) -> jax.Array:
  """``mean|w|`` per output channel, shape ``(1, ..., 1, out)``; without gradient if
  ``detach`` (see :func:`mean_abs_sign`)."""
  alpha = jnp.mean(jnp.abs(kernel), axis=_reduce_axes(kernel), keepdims=True)
  return jax.lax.stop_gradient(alpha) if detach else alpha


def weight_sign_input(kernel: jax.Array, quantizer: str) -> jax.Array:
  """What a weight quantizer's sign is applied to: the standardized kernel for
  Libra-PB, the kernel itself for every other quantizer of :data:`WEIGHT_QUANTIZERS`."""
  return standardize(kernel) if quantizer == "libra_pb" else kernel


def quantize_weights(kernel: jax.Array, quantizer: str = "libra_pb",
                     estimator: str = "ede", ede: EDE | None = None) -> jax.Array:
  """Weight quantizer dispatch, one of :data:`WEIGHT_QUANTIZERS`: "libra_pb", "sign"
  (plain sign, no scale), "mean_abs" / "mean_abs_detached" (:func:`mean_abs_sign`) or
  "none"."""
  if quantizer == "libra_pb":
    return libra_pb(kernel, ede, estimator)
  if quantizer == "sign":
    return binarize(kernel, estimator, ede)
  if quantizer in ("mean_abs", "mean_abs_detached"):
    return mean_abs_sign(kernel, estimator, ede, quantizer == "mean_abs_detached")
  if quantizer == "none":
    return kernel
  raise ValueError(
      f"unknown weight quantizer {quantizer!r}; expected one of {WEIGHT_QUANTIZERS}")


def hardtanh(x: jax.Array) -> jax.Array:
  """``clip(x, -1, 1)``, the activation IR-Net uses instead of ReLU."""
  return jnp.clip(x, -1.0, 1.0)


def rprelu(x: jax.Array, shift_in: jax.Array, slope: jax.Array,
           shift_out: jax.Array) -> jax.Array:
  """ReActNet's RPReLU (Liu et al., ECCV 2020, Eq. 3): ``PReLU(x - gamma) + zeta`` with
  per-channel (last axis) ``gamma = shift_in``, slope ``beta`` and ``zeta = shift_out``."""
  y = x - shift_in
  return jnp.where(y > 0, y, slope * y) + shift_out


ACTIVATIONS = {"hardtanh": hardtanh, "relu": jax.nn.relu}


def activation(name: str):
  """"hardtanh" (1w1a networks) or "relu" (the official 1w32a networks)."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


# ----------------------------------------------------------------------------------
# Convolution.


def conv2d(x: jax.Array, kernel: jax.Array, strides: int = 1, padding: int = 0) -> jax.Array:
  """``F.conv2d`` semantics on NHWC inputs and HWIO kernels, symmetric zero padding."""
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(strides, strides), padding=((padding, padding),) * 2,
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
