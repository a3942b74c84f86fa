"""Packs a trained IR-Net model into a deployable, NNX-free :class:`PackedModel`.

A packed model is a *layer program* (a list of instructions over named registers,
mirroring the model's ``__call__`` in eval mode) plus a flat dict of numpy arrays.
:func:`irnet_jax.export.infer` runs it without the NNX model.

Binary convolutions (binary weights)
------------------------------------
The kernel the model uses, ``q = layer.quantized_kernel()`` (HWIO), is
``sign(w_std) * 2^e[o]`` with ``w_std = standardize(kernel)`` for Libra-PB
(``e = 0`` for the plain "sign" quantizer). It is stored as

* ``<name>/sign``: ``uint32 (out, n_words)``, the sign bits of ``q`` in the library's
  bit layout (:mod:`irnet_jax.bits`): along the HWIO kernel's reduction axis
  flattened to ``K = kh * kw * in``, LSB first in uint32 words. A set bit means
  ``-1``; a clear bit ``+1`` (or 0, see below). ``n_words = ceil(K / 32)``.
* ``<name>/exp``: ``int8 (out,)``, the Libra-PB scale of each output channel as an
  exponent: ``scale = 2^exp``.
* ``<name>/nonzero``: ``uint32 (out, n_words)``, same layout, only present when some
  standardized weight is exactly 0. ``sign(0) = 0`` (as in ``torch.sign``) is a third
  value that one bit cannot hold, so such a weight is stored exactly as a cleared
  bit in this mask: it contributes 0 to every dot product. Layers without zeros
  (the normal case) have no mask and use the cheaper 2-plane dot product.

Activations are packed at inference time with the same bit order, so a dot
product is ``valid - 2 * popcount((a XOR w) AND mask)`` (see :mod:`.infer`).

Float layers
------------
The stem, the 1x1 shortcut convs and the classifier stay float arrays
(``<name>/kernel``, HWIO or ``(in, out)``, and ``<name>/bias``). BatchNorm (eval
mode, running statistics) is stored as the per-channel affine
``y = (x - <name>/mean) * <name>/mul + <name>/bias`` with
``mul = gamma * rsqrt(var + eps)`` precomputed. The mean is deliberately *not*
folded into the bias (``y = a * x + b``): that changes the float rounding of the
BN output, and a one-ulp change right before the next layer's ``sign`` flips a
+-1 activation whenever the value is within an ulp of 0, which breaks bit-exact
agreement with the float model. Keeping the model's own order of operations makes
every value feeding a ``sign`` bitwise identical to the float model's.

Layer program
-------------
Each model family writes its own program next to its forward: ``export_program(b)``
(see :class:`ProgramBuilder`), so the two change together. Instructions
``{"op", "inputs": [registers], "out": register, ...attributes}`` are executed in
order, starting from register ``"input"`` (NHWC images):
``conv`` (kernel_size, strides, padding, in/out_features, binary_weights,
binary_acts, has_zeros), ``bn``, ``act`` (fn: "hardtanh" | "relu"), ``add``,
``max_pool`` (window, stride, padding), ``avg_pool`` (global), ``shortcut_a``
(planes; CIFAR option-A subsample + channel zero-pad), ``flatten_chw`` (torch
order) and ``linear``. Layers with parameters carry ``name`` (their module path,
e.g. ``layer2.0.conv1``), the prefix of their arrays.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from irnet_jax import layers, models, ops
from irnet_jax.bits import num_words, pack_bits, unpack_bits

# Register holding the network input in every program.
INPUT = "input"

# Instruction set of the layer program. Every instruction is a JSON-serializable dict
# ``{"op": ..., "inputs": [register, ...], "out": register, **attrs}``.
OPS = ("conv", "bn", "act", "add", "max_pool", "avg_pool", "shortcut_a", "flatten_chw",
       "linear")


@dataclasses.dataclass(eq=False)
class PackedModel:
  """A model ready for :func:`~irnet_jax.export.infer`, independent of NNX.

  Attributes:
    program: instructions executed in order; register :data:`INPUT` holds the
      NHWC images, ``output`` names the register with the logits.
    output: register holding the logits after the last instruction.
    arrays: parameter arrays keyed ``"<module path>/<field>"`` (see module doc).
    meta: architecture record: ``arch`` (model class), ``name`` and ``kwargs``
      (the ``models.create`` call, when known), ``num_classes``, ``in_channels``.
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
    """Names of the convolutions stored as packed sign bits."""
    return [i["name"] for i in self.program if i["op"] == "conv" and i["binary_weights"]]


def _exponents(q: np.ndarray, name: str) -> np.ndarray:
  """Per output channel ``e`` with ``|q| == 2^e`` wherever ``q != 0`` (q: ``(K, O)``)."""
  if not np.all(np.isfinite(q)):
    raise ValueError(f"{name}: quantized kernel is not finite (a constant kernel channel "
                     "has std 0, so Libra-PB divides by zero); cannot pack it")
  mag = np.abs(q).max(axis=0)
  mag = np.where(mag == 0, 1.0, mag)  # An all-zero channel: any scale works.
  if not np.all((np.abs(q) == mag) | (q == 0)):
    raise ValueError(f"{name}: quantized kernel has more than one magnitude per output "
                     "channel; not a binary (+-scale) kernel")
  mant, exp = np.frexp(mag)  # mag = mant * 2^exp, mant in [0.5, 1)
  if not np.all(mant == 0.5):
    raise ValueError(f"{name}: Libra-PB scale is not an exact power of two "
                     f"({mag[mant != 0.5][:4]}); cannot store it as an exponent")
  e = exp.astype(np.int64) - 1
  if e.min() < -126 or e.max() > 127:
    raise ValueError(f"{name}: scale exponent outside the normal float32 range: "
                     f"[{e.min()}, {e.max()}]")
  return e.astype(np.int8)


class ProgramBuilder:
  """Emits instructions and collects arrays; what ``export_program`` methods call.

  A model's ``export_program(b)`` mirrors its ``__call__`` in eval mode with these
  methods: each takes input register(s) (strings; :attr:`input` holds the images)
  and returns the register of its result. Layers are named by their module path in
  the model being packed (e.g. ``layer2.0.conv1``), the prefix of their arrays.
  """

  input = INPUT

  def __init__(self, names: dict[int, str]):
    self.program: list[dict[str, Any]] = []
    self.arrays: dict[str, np.ndarray] = {}
    self._names = names  # id(module) -> its path
    self._count = 0

  @classmethod
  def for_model(cls, model: nnx.Module) -> ProgramBuilder:
    return cls({id(m): ".".join(map(str, path)) for path, m in nnx.iter_graph(model)
                if isinstance(m, nnx.Module)})

  def _name(self, module: nnx.Module) -> str:
    if id(module) not in self._names:
      raise ValueError(f"{type(module).__name__} is not a submodule of the packed model")
    return self._names[id(module)]

  def emit(self, op: str, inputs: list[str], **attrs) -> str:
    out = f"r{self._count}"
    self._count += 1
    self.program.append(dict(op=op, inputs=list(inputs), out=out, **attrs))
    return out

  def conv(self, x: str, conv: layers.BinaryConv) -> str:
    name = self._name(conv)
    if conv.dtype is not None:
      raise ValueError(f"{name}: pack() supports float32 compute only (dtype=None), got "
                       f"dtype={conv.dtype}")
    attrs = dict(name=name, kernel_size=conv.kernel_size, strides=conv.strides,
                 padding=conv.padding, in_features=conv.in_features,
                 out_features=conv.out_features, binary_weights=bool(conv.binary_weights),
                 binary_acts=bool(conv.binary_acts), has_zeros=False)
    q = np.asarray(conv.quantized_kernel(), np.float32)  # HWIO; eval forward: no EDE
    if conv.binary_weights:
      q2 = q.reshape(-1, conv.out_features)  # (K, O), K in (kh, kw, in) order
      self.arrays[f"{name}/exp"] = _exponents(q2, name)
      self.arrays[f"{name}/sign"] = np.asarray(pack_bits(q2.T < 0))
      if np.any(q2 == 0):
        attrs["has_zeros"] = True
        self.arrays[f"{name}/nonzero"] = np.asarray(pack_bits(q2.T != 0))
    else:
      self.arrays[f"{name}/kernel"] = q
    return self.emit("conv", [x], **attrs)

  def bn(self, x: str, bn: layers.BatchNorm) -> str:
    name = self._name(bn)
    f32 = jnp.float32
    # Same expression, dtype and op order as BatchNorm.__call__ (eval), so that the
    # precomputed multiplier is bitwise the one the float model uses.
    var = bn.var[...].astype(f32)
    mul = bn.scale[...].astype(f32) * jax.lax.rsqrt(var + bn.epsilon)
    self.arrays[f"{name}/mean"] = np.asarray(bn.mean[...].astype(f32))
    self.arrays[f"{name}/mul"] = np.asarray(mul)
    self.arrays[f"{name}/bias"] = np.asarray(bn.bias[...].astype(f32))
    return self.emit("bn", [x], name=name)

  def linear(self, x: str, lin: nnx.Linear) -> str:
    name = self._name(lin)
    self.arrays[f"{name}/kernel"] = np.asarray(lin.kernel[...], np.float32)
    self.arrays[f"{name}/bias"] = np.asarray(lin.bias[...], np.float32)
    return self.emit("linear", [x], name=name)

  def act(self, x: str, fn) -> str:
    """``fn``: one of :data:`irnet_jax.ops.ACTIVATIONS`."""
    names = [k for k, v in ops.ACTIVATIONS.items() if v is fn]
    if not names:
      raise ValueError(f"unsupported activation {fn!r}; expected one of "
                       f"{sorted(ops.ACTIVATIONS)}")
    return self.emit("act", [x], fn=names[0])

  def add(self, x: str, y: str) -> str:
    return self.emit("add", [x, y])

  def max_pool(self, x: str, window: int, stride: int, padding: int = 0) -> str:
    return self.emit("max_pool", [x], window=window, stride=stride, padding=padding)

  def avg_pool(self, x: str) -> str:
    """Global average pool: ``(N, H, W, C) -> (N, C)``."""
    return self.emit("avg_pool", [x])

  def shortcut_a(self, x: str, planes: int) -> str:
    """CIFAR option-A shortcut (:func:`irnet_jax.models.blocks.option_a_shortcut`)."""
    return self.emit("shortcut_a", [x], planes=planes)

  def flatten_chw(self, x: str) -> str:
    """``(N, H, W, C) -> (N, C*H*W)`` in torch's (C, H, W) order."""
    return self.emit("flatten_chw", [x])


def pack_layer(module: nnx.Module, name: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Packs one BinaryConv, BatchNorm or nnx.Linear on its own: its instruction (input
  register :data:`INPUT`) and its arrays keyed by field (``"sign"``, ``"mean"``, ...)."""
  b = ProgramBuilder({id(module): name})
  if isinstance(module, layers.BinaryConv):
    b.conv(INPUT, module)
  elif isinstance(module, layers.BatchNorm):
    b.bn(INPUT, module)
  elif isinstance(module, nnx.Linear):
    b.linear(INPUT, module)
  else:
    raise ValueError(f"pack_layer: unsupported module {type(module).__name__}")
  return b.program[0], {k[len(name) + 1:]: v for k, v in b.arrays.items()}


def pack(model: nnx.Module, *, name: str | None = None,
         kwargs: dict[str, Any] | None = None, **meta) -> PackedModel:
  """Packs ``model`` (any network of :mod:`irnet_jax.models`) for deployment.

  The program is the model's own ``export_program`` (every registry family has one).
  Always exports eval-mode semantics (BatchNorm running statistics), whatever
  mode ``model`` is in. ``name`` and ``kwargs`` (the ``models.create`` call) are
  recorded in ``meta`` when given; ``infer`` only needs the program. Extra
  JSON-serializable ``meta`` entries (e.g. ``config``) are recorded as well.

  Raises:
    ValueError: unsupported model class or compute dtype, or a binary kernel that
      is not ``+-2^e`` per channel (e.g. NaN from a constant channel).
  """
  if not hasattr(model, "export_program"):
    raise ValueError(f"cannot pack {type(model).__name__}: it has no export_program "
                     f"method; models that do: {[c.__name__ for c in models.FAMILIES]}")
  b = ProgramBuilder.for_model(model)
  out = model.export_program(b)
  last = b.program[-1]
  info = dict(arch=type(model).__name__, name=name, kwargs=dict(kwargs or {}),
              num_classes=int(b.arrays[f"{last['name']}/bias"].shape[0]),
              in_channels=int(b.program[0]["in_features"]), **meta)
  return PackedModel(program=b.program, output=out, arrays=b.arrays, meta=info)


def binary_kernel(ins: dict[str, Any], arrays: dict[str, jax.Array]) -> jax.Array:
  """The ``+-2^e`` (or 0) HWIO float32 kernel of binary-weight conv ``ins`` from its
  packed ``arrays`` (keyed by field: ``sign``, ``exp``, ``nonzero``); traceable."""
  k, cin, cout = ins["kernel_size"], ins["in_features"], ins["out_features"]
  kk = k * k * cin
  val = 1.0 - 2.0 * unpack_bits(arrays["sign"], kk).astype(jnp.float32)  # (O, K)
  if ins["has_zeros"]:
    val = val * unpack_bits(arrays["nonzero"], kk).astype(jnp.float32)
  val = val * scale_from_exponent(jnp.asarray(arrays["exp"]))[:, None]
  return val.T.reshape(k, k, cin, cout)


def unpack(packed: PackedModel) -> dict[str, np.ndarray]:
  """The kernel every convolution of the float model uses, keyed by module path.

  Binary layers come back as ``sign * nonzero * 2^exp`` (HWIO float32), i.e. the
  model's ``quantized_kernel()`` bit for bit; float layers as stored.
  """
  kernels = {}
  for ins in packed.program:
    if ins["op"] != "conv":
      continue
    name = ins["name"]
    if not ins["binary_weights"]:
      kernels[name] = packed.arrays[f"{name}/kernel"]
      continue
    fields = {f: packed.arrays[f"{name}/{f}"] for f in ("sign", "exp", "nonzero")
              if f"{name}/{f}" in packed.arrays}
    kernels[name] = np.asarray(binary_kernel(ins, fields))
  return kernels


def expected_arrays(ins: dict[str, Any]) -> dict[str, tuple[tuple[int, ...], str]]:
  """The arrays (shape, dtype) instruction ``ins`` reads; used to validate loaded files."""
  op, name = ins["op"], ins.get("name")
  if op == "conv":
    k, cin, cout = ins["kernel_size"], ins["in_features"], ins["out_features"]
    if not ins["binary_weights"]:
      return {f"{name}/kernel": ((k, k, cin, cout), "float32")}
    nw = num_words(k * k * cin)
    out = {f"{name}/sign": ((cout, nw), "uint32"), f"{name}/exp": ((cout,), "int8")}
    if ins["has_zeros"]:
      out[f"{name}/nonzero"] = ((cout, nw), "uint32")
    return out
  if op == "bn":
    return {f"{name}/{f}": (None, "float32") for f in ("mean", "mul", "bias")}
  if op == "linear":
    return {f"{name}/kernel": (None, "float32"), f"{name}/bias": (None, "float32")}
  return {}


def scale_from_exponent(exp: jax.Array) -> jax.Array:
  """``2^exp`` as float32, exactly (built from the exponent bits, unlike ``exp2``,
  which XLA evaluates inexactly for ``|exp| >= 13``)."""
  bits = (exp.astype(jnp.int32) + 127) << 23
  return jax.lax.bitcast_convert_type(bits, jnp.float32)


# Model bytes if every parameter were float32 (the reference for size comparisons).
def float32_param_bytes(model: nnx.Module) -> int:
  """4 bytes per ``nnx.Param`` element (BN running stats excluded)."""
  return 4 * sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
