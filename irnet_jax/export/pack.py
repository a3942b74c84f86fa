"""Packs a binarized model into a deployable, NNX-free :class:`PackedModel`.

A packed model is a *layer program* (a list of instructions over named registers, the
model's eval-mode ``__call__`` as recorded by tracing it, :mod:`.trace`) plus a flat
dict of numpy arrays. :func:`irnet_jax.export.infer` runs it without the NNX model.
No model needs export code of its own: :func:`pack` traces the forward of any NNX
module built from the layers below and ``jnp``/``lax`` operations on them.

Layers
------
Each call of one of these layers becomes one named instruction (``name``: the module
path, e.g. ``layer2.0.conv1``, the prefix of its arrays):

* :class:`~irnet_jax.layers.BinaryConv` -> ``conv``; :class:`~irnet_jax.layers.BinaryDense`
  -> ``dense`` (any method of :mod:`irnet_jax.methods`, or full precision);
* :class:`~irnet_jax.layers.BatchNorm` -> ``bn``; ``nnx.BatchNorm`` -> ``nnx_bn``;
* ``nnx.Linear`` -> ``linear``; ``nnx.Conv`` (2D, NHWC) -> ``nnx_conv``.

Everything else the forward does (activations, residual adds, pooling, padding,
slicing, reshapes, arithmetic with constants, other layers' operations) becomes generic
instructions named after the ``lax`` primitive (:data:`GENERIC_OPS`); constants are
``const`` instructions (a scalar ``value``, or an array ``<name>/value``).

Binary weights
--------------
The kernel a binary layer uses, ``q = layer.quantized_kernel()`` (HWIO, or ``(in, out)``
for dense), is ``sign * scale[o]`` per output channel ``o``. It is stored as

* ``<name>/sign``: ``uint32 (out, n_words)``, the sign bits of ``q`` in the library's
  bit layout (:mod:`irnet_jax.bits`): along the kernel's reduction axis flattened to
  ``K = kh * kw * in`` (``K = in`` for dense), LSB first in uint32 words. A set bit
  means ``-1``; a clear bit ``+1`` (or 0, see below). ``n_words = ceil(K / 32)``.
* the scale, by quantizer (instruction attribute ``scale``):

  - ``"exp"`` (Libra-PB: ``2^round(log2 mean|w_std|)``; plain "sign": 1):
    ``<name>/exp``, ``int8 (out,)``, ``scale = 2^exp``;
  - ``"float"`` (XNOR-Net / Bi-Real / ReActNet's ``mean|w|``, not a power of two):
    ``<name>/scale``, ``float32 (out,)``.

* ``<name>/nonzero``: ``uint32 (out, n_words)``, same layout, only present when some
  quantized weight is exactly 0. ``sign(0) = 0`` (as in ``torch.sign``) is a third
  value that one bit cannot hold, so such a weight is stored exactly as a cleared
  bit in this mask: it contributes 0 to every dot product. Layers without zeros
  (the normal case) have no mask and use the cheaper 2-plane dot product.

and the method's real-valued extras, when the layer has them: ``<name>/bias``
(``use_bias``), ``<name>/act_shift`` (ReActNet's RSign threshold per input channel:
inputs are binarized as ``sign(x - act_shift)``) and ``<name>/rprelu.shift_in``,
``rprelu.slope``, ``rprelu.shift_out`` (RPReLU on the output, after the bias).

Activations are packed at inference time with the same bit order, so a dot
product is ``valid - 2 * popcount((a XOR w) AND mask)`` (see :mod:`.infer`).

Float layers
------------
The stem, the 1x1 shortcut convs and the classifier stay float arrays
(``<name>/kernel``, HWIO or ``(in, out)``, and ``<name>/bias``). The library's
BatchNorm (eval mode, running statistics) is stored as ``<name>/mean``, ``<name>/mul``
and ``<name>/bias`` with ``mul = gamma * rsqrt(var + eps)`` precomputed, and runs as
the layer does, ``x * mul + (bias - mean * mul)``; flax's ``nnx.BatchNorm`` as flax
does, ``(x - mean) * mul + bias`` (``mul = rsqrt(var + eps) * gamma``). Keeping each
layer's own order of operations (and keeping XLA from contracting them into FMAs,
:mod:`.infer`) makes every value feeding a ``sign`` bitwise identical to the float
model's: a one-ulp change right before a ``sign`` flips a +-1 activation whenever the
value is within an ulp of 0.

Layer program
-------------
Instructions ``{"op", "inputs": [registers], "out": register, ...attributes}`` are
executed in order, starting from register ``"input"`` (NHWC images). The program is
size-agnostic where the forward is (strides, paddings, "to the end" slices, flatten):
a CIFAR ResNet packed at 32x32 runs at any size, as its float model does.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from irnet_jax import layers
from irnet_jax.bits import num_words, pack_bits, unpack_bits

# Register holding the network input in every program.
INPUT = "input"

# Instructions of one named layer each (arrays ``<name>/<field>``).
LAYER_OPS = ("conv", "dense", "bn", "nnx_bn", "linear", "nnx_conv")
# Generic instructions, named after the lax primitive they run (elementwise ones
# broadcast numpy-style), plus ``const``, ``act`` (fn: "hardtanh" | "relu"),
# ``max_pool`` (window, stride, padding) and ``mean`` (axes, keepdims).
UNARY_OPS = ("neg", "abs", "sign", "floor", "ceil", "round", "is_finite", "exp", "exp2",
             "log", "log1p", "expm1", "tanh", "logistic", "sin", "cos", "tan", "sqrt",
             "rsqrt", "cbrt", "erf", "erfc", "erf_inv", "square", "not", "integer_pow",
             "convert_element_type", "expand_dims")
BINARY_OPS = ("add", "sub", "mul", "div", "rem", "pow", "max", "min", "atan2", "and", "or",
              "xor", "eq", "ne", "gt", "ge", "lt", "le")
ELEMENTWISE_OPS = UNARY_OPS + BINARY_OPS + ("select_n", "clamp", "act")
GENERIC_OPS = ELEMENTWISE_OPS + (
    "const", "max_pool", "mean", "reshape", "squeeze", "transpose", "slice", "pad",
    "concatenate", "reduce_sum", "reduce_max", "reduce_min", "reduce_prod",
    "reduce_window_max", "reduce_window_min", "reduce_window_sum", "dot_general",
    "conv_general_dilated")
# Programs of format version 1 (hand-written per model family) also used these.
LEGACY_OPS = ("avg_pool", "shortcut_a", "flatten_chw")
OPS = LAYER_OPS + GENERIC_OPS + LEGACY_OPS

# The dtypes of registers and constants (bool and int32 only inside generic arithmetic).
REGISTER_DTYPES = ("float32", "bool", "int32")
# Attributes each generic instruction must have (checked when a file is loaded).
REQUIRED_ATTRS = {
    "const": ("dtype",),
    "act": ("fn",), "max_pool": ("window", "stride", "padding"), "mean": ("axes",),
    "round": ("rounding_method",), "integer_pow": ("y",),
    "convert_element_type": ("dtype",), "expand_dims": ("axes",), "reshape": ("shape",),
    "squeeze": ("dimensions",), "transpose": ("permutation",),
    "slice": ("start", "limit", "strides"), "pad": ("padding_config", "value"),
    "concatenate": ("dimension",), "shortcut_a": ("planes",),
    **{f"reduce_{r}": ("axes",) for r in ("sum", "max", "min", "prod")},
    **{f"reduce_window_{r}": ("window_dimensions", "window_strides", "padding",
                              "base_dilation", "window_dilation")
       for r in ("max", "min", "sum")},
    "dot_general": ("dimension_numbers", "preferred_element_type"),
    "conv_general_dilated": ("window_strides", "padding", "lhs_dilation", "rhs_dilation",
                             "dimension_numbers", "feature_group_count",
                             "batch_group_count", "preferred_element_type"),
}

# Weight quantizers whose per-channel scale is a power of two (stored as an exponent).
_EXP_QUANTIZERS = ("libra_pb", "sign")


@dataclasses.dataclass(eq=False)
class PackedModel:
  """A model ready for :func:`~irnet_jax.export.infer`, independent of NNX.

  Attributes:
    program: instructions executed in order; register :data:`INPUT` holds the
      input (NHWC images), ``output`` names the register with the logits.
    output: register holding the logits after the last instruction.
    arrays: parameter arrays keyed ``"<module path>/<field>"`` (see module doc).
    meta: architecture record: ``arch`` (model class), ``name`` and ``kwargs``
      (the ``models.create`` call, when known), ``num_classes``, ``in_channels`` and
      ``input_shape`` (one example's shape the program was traced with).
  """
  program: list[dict[str, Any]]
  output: str
  arrays: dict[str, np.ndarray]
  meta: dict[str, Any]
  # Jitted forward and device copies of ``arrays``, built on first use by infer().
  _cache: dict = dataclasses.field(default_factory=dict, repr=False)

  @property
  def nbytes(self) -> int:
    """Bytes of all parameter arrays (the bulk of the file size)."""
    return sum(int(a.nbytes) for a in self.arrays.values())

  def binary_layers(self) -> list[str]:
    """Names of the convolutions and dense layers stored as packed sign bits."""
    return [i["name"] for i in self.program
            if i["op"] in ("conv", "dense") and i["binary_weights"]]


def _check_finite(q: np.ndarray, name: str) -> None:
  if not np.all(np.isfinite(q)):
    raise ValueError(f"{name}: quantized kernel is not finite (a constant kernel channel "
                     "has std 0, so Libra-PB divides by zero); cannot pack it")


def _magnitudes(q: np.ndarray, name: str) -> np.ndarray:
  """Per output channel the one magnitude of ``q`` (``(K, O)``): ``|q| == mag or 0``."""
  _check_finite(q, name)
  mag = np.abs(q).max(axis=0)
  if not np.all((np.abs(q) == mag) | (q == 0)):
    raise ValueError(f"{name}: quantized kernel has more than one magnitude per output "
                     "channel; not a binary (+-scale) kernel")
  return mag


def _exponents(q: np.ndarray, name: str) -> np.ndarray:
  """Per output channel ``e`` with ``|q| == 2^e`` wherever ``q != 0`` (q: ``(K, O)``)."""
  mag = _magnitudes(q, name)
  mag = np.where(mag == 0, 1.0, mag)  # An all-zero channel: any scale works.
  mant, exp = np.frexp(mag)  # mag = mant * 2^exp, mant in [0.5, 1)
  if not np.all(mant == 0.5):
    raise ValueError(f"{name}: Libra-PB scale is not an exact power of two "
                     f"({mag[mant != 0.5][:4]}); cannot store it as an exponent")
  e = exp.astype(np.int64) - 1
  if e.min() < -126 or e.max() > 127:
    raise ValueError(f"{name}: scale exponent outside the normal float32 range: "
                     f"[{e.min()}, {e.max()}]")
  return e.astype(np.int8)


def _f32(v) -> np.ndarray:
  return np.asarray(v, np.float32)


def _require_f32(name: str, module: nnx.Module, *arrays) -> None:
  dtype = getattr(module, "dtype", None)
  if dtype is not None and jnp.dtype(dtype) != jnp.float32:
    raise ValueError(f"{name}: pack() supports float32 compute only (dtype=None), got "
                     f"dtype={dtype}")
  for a in arrays:
    if a is not None and a.dtype != jnp.float32:
      raise ValueError(f"{name}: pack() supports float32 parameters only, got {a.dtype}")


def _pack_binary(layer, name: str, attrs: dict, kernel_shape: tuple[int, ...]
                 ) -> dict[str, np.ndarray]:
  """Arrays (by field) of a BinaryConv/BinaryDense; sets ``attrs``' binary fields."""
  _require_f32(name, layer, layer.kernel[...])
  out = {}
  q = _f32(layer.quantized_kernel())  # eval forward: no EDE
  attrs.update(binary_weights=bool(layer.binary_weights),
               binary_acts=bool(layer.binary_acts), has_zeros=False)
  if layer.binary_weights:
    q2 = q.reshape(-1, layer.out_features)  # (K, O), K in (kh, kw, in) order
    if layer.weight_quantizer in _EXP_QUANTIZERS:
      attrs["scale"] = "exp"
      out["exp"] = _exponents(q2, name)
    else:  # mean|w|: any float; the sign bits times it are q exactly.
      attrs["scale"] = "float"
      out["scale"] = _magnitudes(q2, name).astype(np.float32)
    out["sign"] = np.asarray(pack_bits(q2.T < 0))
    if np.any(q2 == 0):
      attrs["has_zeros"] = True
      out["nonzero"] = np.asarray(pack_bits(q2.T != 0))
  else:
    out["kernel"] = q.reshape(kernel_shape)
  attrs["bias"] = layer.bias is not None
  if layer.bias is not None:
    out["bias"] = _f32(layer.bias[...])
  attrs["act_shift"] = layer.act_shift is not None
  if layer.act_shift is not None:
    out["act_shift"] = _f32(layer.act_shift[...])
  attrs["rprelu"] = layer.rprelu is not None
  if layer.rprelu is not None:
    for k in _RPRELU:
      out[f"rprelu.{k}"] = _f32(layer.rprelu[k][...])
  return out


_RPRELU = ("shift_in", "slope", "shift_out")


def _pack_conv(conv: layers.BinaryConv, name: str):
  attrs = dict(kernel_size=conv.kernel_size, strides=conv.strides, padding=conv.padding,
               in_features=conv.in_features, out_features=conv.out_features)
  k = conv.kernel_size
  return "conv", attrs, _pack_binary(conv, name, attrs,
                                     (k, k, conv.in_features, conv.out_features))


def _pack_dense(dense: layers.BinaryDense, name: str):
  attrs = dict(in_features=dense.in_features, out_features=dense.out_features)
  return "dense", attrs, _pack_binary(dense, name, attrs,
                                      (dense.in_features, dense.out_features))


def _pack_bn(bn: layers.BatchNorm, name: str):
  _require_f32(name, bn, bn.scale[...], bn.var[...])
  f32 = jnp.float32
  # Same expression, dtype and op order as BatchNorm.__call__ (eval), so that the
  # precomputed multiplier is bitwise the one the float model uses.
  var = bn.var[...].astype(f32)
  mul = bn.scale[...].astype(f32) * jax.lax.rsqrt(var + bn.epsilon)
  return "bn", {}, {"mean": _f32(bn.mean[...]), "mul": _f32(mul), "bias": _f32(bn.bias[...])}


def _pack_nnx_bn(bn: nnx.BatchNorm, name: str):
  scale = None if bn.scale is None else bn.scale[...]
  bias = None if bn.bias is None else bn.bias[...]
  _require_f32(name, bn, bn.mean[...], bn.var[...], scale, bias)
  # flax's _normalize: mul = rsqrt(var + eps), then mul *= scale.
  mul = jax.lax.rsqrt(bn.var[...] + bn.epsilon)
  if scale is not None:
    mul = mul * scale
  out = {"mean": _f32(bn.mean[...]), "mul": _f32(mul)}
  if bias is not None:
    out["bias"] = _f32(bias)
  return "nnx_bn", {"bias": bias is not None}, out


def _pack_linear(lin: nnx.Linear, name: str):
  bias = None if lin.bias is None else lin.bias[...]
  _require_f32(name, lin, lin.kernel[...], bias)
  out = {"kernel": _f32(lin.kernel[...])}
  if bias is not None:
    out["bias"] = _f32(bias)
  return "linear", {"bias": bias is not None}, out


def _pack_nnx_conv(conv: nnx.Conv, name: str):
  from flax.nnx.nn.linear import canonicalize_padding  # pylint: disable=import-outside-toplevel
  kernel = conv.kernel[...]
  bias = None if conv.bias is None else conv.bias[...]
  _require_f32(name, conv, kernel, bias)
  if conv.mask is not None:
    kernel = kernel * conv.mask  # as nnx.Conv.__call__ does
  pair = lambda v: [1, 1] if v is None else ([v, v] if isinstance(v, int) else list(v))  # noqa: E731
  padding = canonicalize_padding(conv.padding, 2)
  attrs = dict(kernel_size=list(conv.kernel_size), in_features=conv.in_features,
               out_features=conv.out_features, strides=pair(conv.strides),
               padding=padding if isinstance(padding, str) else [list(p) for p in padding],
               lhs_dilation=pair(conv.input_dilation), rhs_dilation=pair(conv.kernel_dilation),
               feature_group_count=conv.feature_group_count, bias=bias is not None)
  out = {"kernel": _f32(kernel)}
  if bias is not None:
    out["bias"] = _f32(bias)
  return "nnx_conv", attrs, out


_PACKERS = (
    (layers.BinaryConv, _pack_conv), (layers.BinaryDense, _pack_dense),
    (layers.BatchNorm, _pack_bn), (nnx.BatchNorm, _pack_nnx_bn),
    (nnx.Linear, _pack_linear), (nnx.Conv, _pack_nnx_conv),
)
# Layers that become one instruction each when the traced forward calls them.
LEAF_TYPES = tuple(t for t, _ in _PACKERS)
# The library's own layers: an unsupported configuration is an error (the others are
# traced operation by operation instead).
OWN_LEAF_TYPES = (layers.BinaryConv, layers.BinaryDense, layers.BatchNorm)


def leaf_problem(module: nnx.Module, x: Any, args: tuple, kwargs: dict) -> str | None:
  """Why a call ``module(x, *args, **kwargs)`` in the traced forward cannot be one
  instruction (None: it can)."""
  kwargs = dict(kwargs)
  if getattr(x, "dtype", None) != jnp.float32:
    return f"input dtype {getattr(x, 'dtype', type(x).__name__)} (float32 only)"
  if isinstance(module, nnx.BatchNorm):
    use_running = kwargs.pop("use_running_average", None)
    if args or kwargs:
      return "arguments besides the input"
    if not (module.use_running_average if use_running is None else use_running):
      return "BatchNorm in training mode (pack exports eval mode)"
    axis = module.axis if isinstance(module.axis, int) else tuple(module.axis)
    if axis not in (-1, x.ndim - 1, (-1,), (x.ndim - 1,)):
      return f"normalizes axis {module.axis}, not the last"
    return None
  if args or kwargs:
    return "arguments besides the input"
  if isinstance(module, layers.BinaryConv):
    return None if x.ndim == 4 else f"input of rank {x.ndim} (NHWC only)"
  if isinstance(module, layers.BatchNorm):
    return None if module.use_running_average else (
        "BatchNorm in training mode (pack exports eval mode)")
  if isinstance(module, (nnx.Linear, nnx.Conv)):
    if module.precision is not None or module.preferred_element_type is not None:
      return "a precision or preferred_element_type"
    if isinstance(module, nnx.Linear):
      return None if module.dot_general is jax.lax.dot_general else "a custom dot_general"
    if module.conv_general_dilated is not jax.lax.conv_general_dilated:
      return "a custom conv_general_dilated"
    if len(module.kernel_size) != 2 or x.ndim != 4:
      return "not a 2D convolution of NHWC inputs"
    if isinstance(module.padding, str) and module.padding.upper() not in ("SAME", "VALID"):
      return f"padding {module.padding!r}"
  return None


def pack_leaf(module: nnx.Module, name: str) -> tuple[str, dict[str, Any],
                                                      dict[str, np.ndarray]]:
  """``(op, attributes, arrays by field)`` of one layer of :data:`LEAF_TYPES`."""
  for cls, packer in _PACKERS:
    if isinstance(module, cls):
      return packer(module, name)
  raise ValueError(f"{name}: unsupported layer {type(module).__name__}; expected one of "
                   f"{[t.__name__ for t in LEAF_TYPES]}")


def pack_layer(module: nnx.Module, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Packs one layer of :data:`LEAF_TYPES` on its own: its instruction (input register
  :data:`INPUT`) and its arrays keyed by field (``"sign"``, ``"mean"``, ...)."""
  op, attrs, arrays = pack_leaf(module, name)
  return dict(op=op, inputs=[INPUT], out="r0", name=name, **attrs), arrays


def pack(model: nnx.Module, *, input_shape: Sequence[int] | None = None,
         name: str | None = None, kwargs: dict[str, Any] | None = None,
         **meta) -> PackedModel:
  """Packs ``model`` (any NNX module; see the module doc) for deployment.

  The program is the model's own eval-mode forward, traced (:mod:`.trace`): no model
  needs export code. Always exports eval-mode semantics (BatchNorm running
  statistics), whatever mode ``model`` is in; ``model`` itself is not changed.

  Args:
    model: the model; its forward takes one float32 array (a batch).
    input_shape: one example's shape, e.g. ``(32, 32, 3)``. None: ``(S, S, C)`` with
      ``C`` the first convolution's input channels and ``S`` the ``config`` meta's
      ``dataset.image_size``, else the registry's input size of ``name`` or of the
      model's class, else 32.
    name, kwargs: the ``models.create`` call, recorded in ``meta`` when given; ``infer``
      only needs the program. Extra JSON-serializable ``meta`` entries (e.g.
      ``config``) are recorded as well.

  Raises:
    ValueError: an operation the program cannot express (named, with the layer near
      it), a non-float32 layer, or a binary kernel that is not ``+-scale`` per channel
      (e.g. NaN from a constant channel).
  """
  from irnet_jax.export import trace as trace_lib  # pylint: disable=import-outside-toplevel
  shape = _input_shape(model, input_shape, name, meta)
  traced = trace_lib.trace(model, shape)
  out_shape = traced.out_shape
  info = dict(arch=type(model).__name__, name=name, kwargs=dict(kwargs or {}),
              num_classes=int(out_shape[-1]) if out_shape else None,
              in_channels=int(shape[-1]), input_shape=list(shape), **meta)
  return PackedModel(program=traced.program, output=traced.output, arrays=traced.arrays,
                     meta=info)


def _input_shape(model: nnx.Module, input_shape: Sequence[int] | None, name: str | None,
                 meta: dict[str, Any]) -> tuple[int, ...]:
  if input_shape is not None:
    shape = tuple(int(d) for d in input_shape)
    if not shape or min(shape) < 1:
      raise ValueError(f"input_shape must be one example's shape, e.g. (32, 32, 3); "
                       f"got {input_shape}")
    return shape
  from irnet_jax import models  # pylint: disable=import-outside-toplevel
  from irnet_jax.export import trace as trace_lib  # pylint: disable=import-outside-toplevel
  first = next((m for _, m in trace_lib.leaves(model)
                if isinstance(m, (layers.BinaryConv, nnx.Conv))), None)
  if first is None:
    raise ValueError(f"cannot tell the input shape of {type(model).__name__} (it has no "
                     "convolution); pass pack(..., input_shape=...)")
  size = None
  config = meta.get("config")
  if isinstance(config, dict):
    size = (config.get("dataset") or {}).get("image_size")
  if size is None and name in models.REGISTRY:
    size = models.REGISTRY[name].input_size
  if size is None:
    size = next((s.input_size for s in models.REGISTRY.values()
                 if s.family is type(model)), 32)
  return (int(size), int(size), int(first.in_features))


def _kernel_shape(ins: dict[str, Any]) -> tuple[int, ...]:
  if ins["op"] == "dense":
    return (ins["in_features"], ins["out_features"])
  k = ins["kernel_size"]
  return (k, k, ins["in_features"], ins["out_features"])


def binary_kernel(ins: dict[str, Any], arrays: dict[str, jax.Array]) -> jax.Array:
  """The ``+-scale`` (or 0) float32 kernel (HWIO, or ``(in, out)`` for dense) of the
  binary-weight layer ``ins`` from its packed ``arrays`` (keyed by field: ``sign``,
  ``exp`` or ``scale``, ``nonzero``); traceable."""
  shape = _kernel_shape(ins)
  kk = math.prod(shape[:-1])
  val = 1.0 - 2.0 * unpack_bits(arrays["sign"], kk).astype(jnp.float32)  # (O, K)
  if ins["has_zeros"]:
    val = val * unpack_bits(arrays["nonzero"], kk).astype(jnp.float32)
  val = val * weight_scale(ins, arrays)[:, None]
  return val.T.reshape(shape)


def weight_scale(ins: dict[str, Any], arrays: dict[str, jax.Array]) -> jax.Array:
  """The per-output-channel float32 scale of a binary-weight layer."""
  if ins.get("scale", "exp") == "exp":
    return scale_from_exponent(jnp.asarray(arrays["exp"]))
  return jnp.asarray(arrays["scale"], jnp.float32)


def unpack(packed: PackedModel) -> dict[str, np.ndarray]:
  """The kernel every BinaryConv and BinaryDense of the float model uses, keyed by
  module path.

  Binary layers come back as ``sign * nonzero * scale`` (HWIO or ``(in, out)``
  float32), i.e. the model's ``quantized_kernel()`` bit for bit; float ones as stored.
  """
  kernels = {}
  for ins in packed.program:
    if ins["op"] not in ("conv", "dense"):
      continue
    name = ins["name"]
    if not ins["binary_weights"]:
      kernels[name] = packed.arrays[f"{name}/kernel"]
      continue
    fields = {f: packed.arrays[f"{name}/{f}"] for f in ("sign", "exp", "scale", "nonzero")
              if f"{name}/{f}" in packed.arrays}
    kernels[name] = np.asarray(binary_kernel(ins, fields))
  return kernels


def expected_arrays(ins: dict[str, Any]) -> dict[str, tuple[tuple[int, ...] | None, str]]:
  """The arrays (shape, dtype) instruction ``ins`` reads; used to validate loaded files.
  Raises KeyError/TypeError/ValueError for a missing or malformed attribute."""
  op, name = ins["op"], ins.get("name")
  for attr in REQUIRED_ATTRS.get(op, ()):
    ins[attr]  # pylint: disable=pointless-statement
  if op in ("const", "convert_element_type") and ins["dtype"] not in REGISTER_DTYPES:
    raise ValueError(f"dtype {ins['dtype']!r} is not one of {REGISTER_DTYPES}")
  if op == "const" and name is None and not isinstance(ins["value"], (bool, int, float)):
    raise ValueError(f"value {ins['value']!r} is not a number")
  if op == "act" and ins["fn"] not in ("hardtanh", "relu"):
    raise ValueError(f"unknown activation {ins['fn']!r}")
  f32 = "float32"
  if op in ("conv", "dense"):
    shape = _kernel_shape(ins)
    if not all(isinstance(d, int) and d > 0 for d in shape):
      raise ValueError(f"bad layer sizes {shape}")
    cin, cout = shape[-2], shape[-1]
    if not ins["binary_weights"]:
      out = {"kernel": (shape, f32)}
    else:
      nw = num_words(math.prod(shape[:-1]))
      out = {"sign": ((cout, nw), "uint32")}
      scale = ins.get("scale", "exp")
      if scale not in ("exp", "float"):
        raise ValueError(f"unknown scale {scale!r}")
      out.update({"exp": ((cout,), "int8")} if scale == "exp" else {"scale": ((cout,), f32)})
      if ins["has_zeros"]:
        out["nonzero"] = ((cout, nw), "uint32")
    if ins.get("bias"):
      out["bias"] = ((cout,), f32)
    if ins.get("act_shift"):
      out["act_shift"] = ((cin,), f32)
    if ins.get("rprelu"):
      out.update({f"rprelu.{k}": ((cout,), f32) for k in _RPRELU})
  elif op == "bn":
    out = {f: (None, f32) for f in ("mean", "mul", "bias")}
  elif op == "nnx_bn":
    out = {f: (None, f32) for f in ("mean", "mul") + (("bias",) if ins["bias"] else ())}
  elif op == "linear":
    out = {f: (None, f32) for f in ("kernel",) + (("bias",) if ins.get("bias", True) else ())}
  elif op == "nnx_conv":
    kh, kw = ins["kernel_size"]
    cin, cout, groups = ins["in_features"], ins["out_features"], ins["feature_group_count"]
    out = {"kernel": ((kh, kw, cin // groups, cout), f32)}
    if ins["bias"]:
      out["bias"] = ((cout,), f32)
  elif op == "const" and name is not None:
    out = {"value": (None, f32)}
  else:
    return {}
  return {f"{name}/{k}": v for k, v in out.items()}


def scale_from_exponent(exp: jax.Array) -> jax.Array:
  """``2^exp`` as float32, exactly (built from the exponent bits, unlike ``exp2``,
  which XLA evaluates inexactly for ``|exp| >= 13``)."""
  bits = (exp.astype(jnp.int32) + 127) << 23
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


# Model bytes if every parameter were float32 (the reference for size comparisons).
def float32_param_bytes(model: nnx.Module) -> int:
  """4 bytes per ``nnx.Param`` element (BN running stats excluded)."""
  return 4 * sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
