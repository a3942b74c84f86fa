"""Flax NNX layers over :mod:`irnet_jax.ops`.

* :class:`BinaryConv` -- IR-Net's ``IRConv2d``: Libra-PB weights and EDE-binarized
  inputs, or any ablation or method of :mod:`irnet_jax.methods`; with 32 bits for both
  it is a plain convolution, which the models use for their full-precision first layer
  and shortcuts.
* :class:`BinaryDense` -- the same for a dense layer.
* :class:`BatchNorm` -- batch normalization with PyTorch's semantics.

Inside ``nnx.capture(fn, BinaryInput)`` a binary-activation layer sows its input
(before the sign) as ``"binary_input"`` (:func:`irnet_jax.diagnostics.binary_conv_inputs`);
outside it the layers store nothing.

Layouts: activations NHWC, kernels HWIO (``(kh, kw, in, out)``). A convolution runs
on the backend named by ``conv_impl`` at construction (:mod:`irnet_jax.kernels`).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from irnet_jax import kernels, ops

Dtype = Any


def he_normal(mode: str = "fan_in") -> nnx.Initializer:
  """``N(0, 2/fan)``: torch ``kaiming_normal_`` (fan_in) or the ``normal_(0, sqrt(2/n))``
  with ``n = k*k*out`` of the official ImageNet/VGG code (fan_out)."""
  return nnx.initializers.variance_scaling(2.0, mode, "normal")


class EDEState(nnx.Variable):
  """EDE's ``t`` or ``k`` held by a binary layer (a float32 scalar), set from training
  progress by :func:`irnet_jax.binarize.set_progress` inside the train step, so that any
  model's ``__call__`` binarizes with the current (t, k) without passing them down.
  Not a Param: optimizers and gradients ignore it. A scalar in the layer's param_dtype."""


class BinaryInput(nnx.Intermediate):
  """The input of a binary-activation layer (before its sign), sown under the name
  ``"binary_input"`` when collected with ``nnx.capture(fn, BinaryInput)``: a tuple with
  one array per call, e.g. NHWC ``(N, H, W, in)`` for a conv."""


class _Binary(nnx.Module):
  """What BinaryConv and BinaryDense share: the latent kernel (last axis = output
  channels), its quantizer, the inputs' sign with its estimator, EDE's (t, k), and the
  method's extra parameters (ReActNet's threshold and RPReLU; an optional bias)."""

  def _init_binary(self, kernel: jax.Array, in_features: int, out_features: int, *,
                   weight_bits: int, act_bits: int, estimator: str,
                   weight_estimator: str | None, weight_quantizer: str,
                   act_threshold: bool, rprelu: bool, use_bias: bool,
                   param_dtype: Dtype) -> None:
    if weight_bits not in (1, 32) or act_bits not in (1, 32):
      raise ValueError(f"weight_bits and act_bits must be 1 or 32, got "
                       f"{weight_bits} and {act_bits}")
    weight_estimator = weight_estimator or estimator
    for name, value in (("estimator", estimator), ("weight_estimator", weight_estimator)):
      if value not in ops.ESTIMATORS:
        raise ValueError(f"unknown {name} {value!r}; expected one of {ops.ESTIMATORS}")
    if weight_quantizer not in ops.WEIGHT_QUANTIZERS:
      raise ValueError(f"unknown weight_quantizer {weight_quantizer!r}; expected one of "
                       f"{ops.WEIGHT_QUANTIZERS}")
    self.kernel = nnx.Param(kernel)
    self.in_features, self.out_features = in_features, out_features
    self.binary_weights = weight_bits == 1 and weight_quantizer != "none"
    self.binary_acts = act_bits == 1
    self.estimator, self.weight_estimator = estimator, weight_estimator
    self.weight_quantizer = weight_quantizer
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if use_bias else None
    self.act_shift = (nnx.Param(jnp.zeros((in_features,), param_dtype))
                      if act_threshold and self.binary_acts else None)
    # ReActNet's init: shifts 0, slope 0.25 (PReLU's). Three arrays, not one shared: the
    # train step donates its state, and XLA refuses a buffer donated twice.
    full = lambda v: nnx.Param(jnp.full((out_features,), v, param_dtype))  # noqa: E731
    self.rprelu = nnx.Dict(shift_in=full(0.0), slope=full(0.25),
                           shift_out=full(0.0)) if rprelu else None
    uses_ede = "ede" in ((estimator,) if self.binary_acts else ()) + (
        (weight_estimator,) if self.binary_weights else ())
    # In the parameters' dtype: a float64 model's EDE backward is float64 throughout.
    self.ede_t = EDEState(jnp.asarray(ops.DEFAULT_EDE.t, param_dtype)) if uses_ede else None
    self.ede_k = EDEState(jnp.asarray(ops.DEFAULT_EDE.k, param_dtype)) if uses_ede else None

  @property
  def ede(self) -> ops.EDE | None:
    """The (t, k) this layer binarizes with (None: it uses no EDE)."""
    return None if self.ede_t is None else ops.EDE(self.ede_t[...], self.ede_k[...])

  def quantized_kernel(self) -> jax.Array:
    """The kernel the layer computes with (its Flax layout): quantized, or the float one."""
    kernel, scale = self._kernel_and_scale()
    return kernel if scale is None else kernel * scale

  def _kernel_and_scale(self) -> tuple[jax.Array, jax.Array | None]:
    """``(kernel to convolve with, per-output-channel scale applied after or None)``.

    XNOR-Net's and Bi-Real's ``sign(w) * mean|w|`` convolve with ``sign(w)`` and scale
    the output, as XNOR-Net writes it: the same function and gradients, and the output
    is ``alpha * (exact integer sum)``, which packed XNOR/popcount inference reproduces
    bit for bit (a sum of +-alpha terms would round differently)."""
    kernel = self.kernel[...]
    if not self.binary_weights:
      return kernel, None
    if self.weight_quantizer in ("mean_abs", "mean_abs_detached"):
      scale = ops.mean_abs_scale(kernel, self.weight_quantizer == "mean_abs_detached")
      return ops.binarize(kernel, self.weight_estimator, self.ede), scale.reshape(-1)
    return ops.quantize_weights(kernel, self.weight_quantizer, self.weight_estimator,
                                self.ede), None

  def _sow_input(self, x: jax.Array) -> None:
    """Sows ``x`` as :class:`BinaryInput` if the layer binarizes its input and runs
    inside ``nnx.capture``. Outside it (training, eval, export) nothing is stored and
    nothing is traced: flax 0.12's ``sow`` outside a capture would set an attribute on
    the layer (deprecated), which would put activations into the model's state."""
    if self.binary_acts and hasattr(self, "__captures__"):  # set by nnx.capture only
      self.sow(BinaryInput, "binary_input", x)

  def _shifted(self, x: jax.Array) -> jax.Array:
    """The input the sign sees: ``x - threshold`` with RSign, else ``x``."""
    self._sow_input(x)
    return x if self.act_shift is None else x - self.act_shift[...].astype(x.dtype)

  def _finish(self, y: jax.Array, scale: jax.Array | None) -> jax.Array:
    """The weight scale (if applied after), bias, then RPReLU, on the output (last axis =
    output channels)."""
    if scale is not None:
      y = y * scale.astype(y.dtype)
    if self.bias is not None:
      y = y + self.bias[...].astype(y.dtype)
    if self.rprelu is not None:
      # By name: under nnx.capture (the diagnostics) the Dict also holds __captures__.
      r = {k: self.rprelu[k][...].astype(y.dtype) for k in ("shift_in", "slope", "shift_out")}
      y = ops.rprelu(y, r["shift_in"], r["slope"], r["shift_out"])
    return y


class BinaryConv(_Binary):
  """kxk convolution with binary weights (Libra-PB) and binary inputs (EDE), or any
  method of :mod:`irnet_jax.methods` (``methods.get(name).layer_kwargs()``).

  ``x (N, H, W, in) -> (N, H', W', out)``, kernel HWIO. The input is binarized *before*
  zero padding, so border taps see 0 (not +-1), exactly like ``F.conv2d`` on ``sign(x)``.

  Args:
    in_features, out_features: channels.
    kernel_size, strides, padding: as in ``nn.Conv2d`` (symmetric integer padding).
    weight_bits: 1 (quantized with ``weight_quantizer``) or 32 (float).
    act_bits: 1 (inputs binarized with ``estimator``) or 32 (float).
    estimator: backward of the inputs' sign: "ede", "ste" or "approx_sign".
    weight_estimator: backward of the weights' sign (None: ``estimator``).
    weight_quantizer: one of :data:`irnet_jax.ops.WEIGHT_QUANTIZERS`.
    act_threshold: ReActNet's RSign, a learnable threshold per input channel.
    rprelu: ReActNet's RPReLU on the output.
    use_bias: a float bias per output channel (kept from a user's ``nnx.Conv``).
    dtype: compute dtype of the convolution (e.g. bfloat16); None keeps the
      promoted dtype of input and kernel.
    conv_impl: the resolved convolution backend, "xla", "xla_cpu" or "avx512"
      (:func:`irnet_jax.kernels.resolve`; ``models.create`` resolves "auto").
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *,
               strides: int = 1, padding: int = 1, weight_bits: int = 1,
               act_bits: int = 1, estimator: str = "ede", weight_estimator: str | None = None,
               weight_quantizer: str = "libra_pb", act_threshold: bool = False,
               rprelu: bool = False, use_bias: bool = False,
               kernel_init: nnx.Initializer | None = None,
               dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
               conv_impl: str = "xla", rngs: nnx.Rngs):
    kernels.get(conv_impl)  # a clear error for an unknown or unresolved name
    init = kernel_init or he_normal("fan_in")
    shape = (kernel_size, kernel_size, in_features, out_features)
    self._init_binary(init(rngs.params(), shape, param_dtype), in_features, out_features,
                      weight_bits=weight_bits, act_bits=act_bits, estimator=estimator,
                      weight_estimator=weight_estimator, weight_quantizer=weight_quantizer,
                      act_threshold=act_threshold, rprelu=rprelu, use_bias=use_bias,
                      param_dtype=param_dtype)
    self.kernel_size, self.strides, self.padding = kernel_size, strides, padding
    self.dtype = dtype
    self.conv_impl = conv_impl

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel, scale = self._kernel_and_scale()
    y = kernels.get(self.conv_impl).conv(
        self._shifted(x), kernel, self.strides, self.padding,
        estimator=self.estimator if self.binary_acts else None, ede=self.ede,
        binary_kernel=self.binary_weights, dtype=self.dtype)
    return self._finish(y, scale)


class BinaryDense(_Binary):
  """Dense layer with binary weights and binary inputs: ``x (..., in) -> (..., out)``,
  kernel ``(in, out)`` (``nnx.Linear``'s layout), the same quantizers, estimators and
  method parameters as :class:`BinaryConv`. Runs on XLA on every backend (the CPU
  kernels are convolutions)."""

  def __init__(self, in_features: int, out_features: int, *, weight_bits: int = 1,
               act_bits: int = 1, estimator: str = "ede", weight_estimator: str | None = None,
               weight_quantizer: str = "libra_pb", act_threshold: bool = False,
               rprelu: bool = False, use_bias: bool = True,
               kernel_init: nnx.Initializer | None = None, dtype: Dtype | None = None,
               param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
    init = kernel_init or nnx.initializers.lecun_normal()
    self._init_binary(init(rngs.params(), (in_features, out_features), param_dtype),
                      in_features, out_features, weight_bits=weight_bits,
                      act_bits=act_bits, estimator=estimator,
                      weight_estimator=weight_estimator, weight_quantizer=weight_quantizer,
                      act_threshold=act_threshold, rprelu=rprelu, use_bias=use_bias,
                      param_dtype=param_dtype)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self._shifted(x)
    if self.binary_acts:
      x = ops.binarize(x, self.estimator, self.ede)
    kernel, scale = self._kernel_and_scale()
    dtype = self.dtype or jnp.result_type(x, kernel)
    return self._finish(jnp.dot(x.astype(dtype), kernel.astype(dtype)), scale)


class BatchNorm(nnx.Module):
  """Batch normalization over the last axis with ``torch.nn.BatchNorm{1,2}d`` semantics.

  Written here instead of ``nnx.BatchNorm`` because PyTorch updates the running
  variance with the *unbiased* batch variance (n/(n-1)), which nnx does not; the
  official checkpoints and their eval numbers depend on it. ``momentum`` is
  PyTorch's (weight of the new batch, 0.1). Statistics are computed in at least
  float32 whatever the compute dtype; the output has the input's dtype.

  Params: ``scale``, ``bias``; batch stats: ``mean``, ``var`` (all shape ``(C,)``).
  """

  def __init__(self, num_features: int, *, momentum: float = 0.1, epsilon: float = 1e-5,
               param_dtype: Dtype = jnp.float32, use_running_average: bool = False,
               rngs: nnx.Rngs | None = None):
    del rngs  # Deterministic init; kept for a uniform constructor signature.
    self.scale = nnx.Param(jnp.ones((num_features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((num_features,), param_dtype))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), param_dtype))
    self.var = nnx.BatchStat(jnp.ones((num_features,), param_dtype))
    self.momentum, self.epsilon = momentum, epsilon
    self.use_running_average = use_running_average

  def __call__(self, x: jax.Array) -> jax.Array:
    stat_dtype = jnp.promote_types(jnp.promote_types(x.dtype, jnp.float32),
                                   self.scale.dtype)
    xs = x.astype(stat_dtype)
    axes = tuple(range(x.ndim - 1))
    if self.use_running_average:
      mean, var = self.mean[...].astype(stat_dtype), self.var[...].astype(stat_dtype)
    else:
      # One pass, E[x^2] - E[x]^2 (Flax's default "fast variance"): XLA:CPU would
      # otherwise materialize x - mean, a full extra read and write per BN layer.
      mean = jnp.mean(xs, axis=axes)
      var = jnp.maximum(jnp.mean(jnp.square(xs), axis=axes) - jnp.square(mean), 0)
      n = x.size // x.shape[-1]
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = ((1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
                        ).astype(self.mean.dtype)
      self.var[...] = ((1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
                       ).astype(self.var.dtype)
    scale = self.scale[...].astype(stat_dtype) * jax.lax.rsqrt(var + self.epsilon)
    # x * a + b rather than (x - mean) * a + bias: no centred copy of x to keep.
    y = xs * scale + (self.bias[...].astype(stat_dtype) - mean * scale)
    return y.astype(x.dtype)


def max_pool(x: jax.Array, window: int, stride: int, padding: int = 0) -> jax.Array:
  """``nn.MaxPool2d(window, stride, padding)`` on NHWC: pads with -inf."""
  p = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  # A Python scalar init lets JAX recognise the max monoid (reduce_window_max, which
  # has a gradient); an array init falls back to the generic, non-differentiable op.
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), p)


def global_avg_pool(x: jax.Array) -> jax.Array:
  """``(N, H, W, C) -> (N, C)``."""
  return jnp.mean(x, axis=(1, 2))


def conv_kwargs(weight_bits: int, act_bits: int, estimator: str, weight_quantizer: str,
                dtype: Dtype | None, param_dtype: Dtype, conv_impl: str = "xla") -> dict:
  """The keyword arguments every model passes to its binary convolutions."""
  return dict(weight_bits=weight_bits, act_bits=act_bits, estimator=estimator,
              weight_quantizer=weight_quantizer, dtype=dtype, param_dtype=param_dtype,
              conv_impl=conv_impl)


def fp_conv(in_features: int, out_features: int, kernel_size: int, *, strides: int = 1,
            padding: int = 0, kernel_init: nnx.Initializer | None = None,
            dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
            conv_impl: str = "xla", rngs: nnx.Rngs) -> BinaryConv:
  """A full-precision convolution (first layer, 1x1 shortcuts)."""
  return BinaryConv(in_features, out_features, kernel_size, strides=strides,
                    padding=padding, weight_bits=32, act_bits=32, kernel_init=kernel_init,
                    dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)


def dense(in_features: int, out_features: int, *, kernel_init: nnx.Initializer | None = None,
          dtype: Dtype | None = None, param_dtype: Dtype = jnp.float32,
          rngs: nnx.Rngs) -> nnx.Linear:
  """Full-precision last layer (``nn.Linear`` with bias); kernel ``(in, out)``."""
  kw = {} if kernel_init is None else {"kernel_init": kernel_init}
  return nnx.Linear(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                    rngs=rngs, **kw)
