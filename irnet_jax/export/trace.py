"""The layer program of any NNX model, read off its own eval-mode forward.

:func:`trace` runs ``model(x)`` under ``jax.make_jaxpr`` (abstract values: nothing is
computed) on a copy of the model (``nnx.clone``, in eval mode) in which every layer of
:data:`~irnet_jax.export.pack.LEAF_TYPES` (the library's BinaryConv, BinaryDense and
BatchNorm; flax's ``nnx.Conv``, ``nnx.Linear``, ``nnx.BatchNorm``) is replaced, on its
parent, by a small probe module. A probe calls its layer inside ``jax.jit`` of a
function named ``irnet_export__<i>``, so each layer call shows up in the jaxpr as one
``jit`` equation whose input and output variables are the registers of the program.
No class is patched and the model itself is left alone.

The walk over the jaxpr then turns

* each layer call into that layer's instruction (:func:`~irnet_jax.export.pack.pack_leaf`);
* each other primitive into a generic instruction of the same name
  (:data:`~irnet_jax.export.pack.GENERIC_OPS`), after recognizing a few patterns
  that keep programs readable and size-agnostic: ``jnp.clip(x, -1, 1)`` and
  ``max(x, 0)`` -> ``act`` (hardtanh, relu), a max ``reduce_window`` over H, W ->
  ``max_pool``, ``reduce_sum`` divided by the element count -> ``mean``;
* computations on constants alone (kernels a module quantizes in its forward, a
  ``jnp.pad`` value, ...) into their values, evaluated here (constant folding);
* calls (``jit``, ``custom_jvp``/``custom_vjp``) into their bodies, inlined, and
  identities (``stop_gradient``, the AVX-512 backend's ``materialize``) into nothing.

Any other primitive stops the export with one ValueError that names it, its operand
shapes, the last layer before it and the source line. A layer in a configuration the
program cannot express is traced operation by operation instead (e.g. an ``nnx.Conv``
with ``padding="CIRCULAR"``), except the library's own binary layers, whose error
names the layer.

The batch size of the trace is :data:`BATCH`; reshapes must keep the batch axis.
"""
from __future__ import annotations

import collections
import dataclasses
import math
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.extend import core as jcore

from irnet_jax.export.pack import (
  BINARY_OPS,
  INPUT,
  LEAF_TYPES,
  OWN_LEAF_TYPES,
  REGISTER_DTYPES,
  UNARY_OPS,
  leaf_problem,
  pack_leaf,
)
from irnet_jax.stand_in import StandIn

BATCH = 2  # not 1, so that the batch axis is told apart from unit axes
_PREFIX = "irnet_export__"

# Primitives that compute their input unchanged.
_IDENTITIES = ("stop_gradient", "copy", "copy_p", "optimization_barrier")
# Primitives whose body is inlined.
_CALLS = ("jit", "pjit", "closed_call", "core_call", "remat", "checkpoint",
          "custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr")
# The AVX-512 backend's materialize (irnet_jax.kernels.avx512): an identity.
_IDENTITY_FFI = ("irnet_materialize",)
_SIMPLE_UNARY = tuple(o for o in UNARY_OPS
                      if o not in ("round", "integer_pow", "convert_element_type",
                                   "expand_dims"))


# --- the module tree ---------------------------------------------------------------


def _children(node: Any) -> Iterator[tuple[Any, Any]]:
  """(key, child) in definition order; keys index lists as ints."""
  if isinstance(node, (nnx.List, list, tuple)):
    yield from enumerate(node)
  elif isinstance(node, dict):
    yield from node.items()
  elif isinstance(node, nnx.Module):  # also nnx.Dict
    for key, value in vars(node).items():
      if not key.startswith("_pytree__"):
        yield key, value


def _walk(node: Any, path: tuple = (), seen: set | None = None
          ) -> Iterator[tuple[tuple, Any, Any, nnx.Module]]:
  """(path, parent, key, module) of every module reference below ``node``, depth
  first in definition order; a layer of LEAF_TYPES is not entered, a shared module is
  entered once."""
  seen = set() if seen is None else seen
  for key, child in _children(node):
    if isinstance(child, nnx.Module):
      yield path + (key,), node, key, child
      if isinstance(child, LEAF_TYPES) or id(child) in seen:
        continue
      seen.add(id(child))
    if isinstance(child, (nnx.Module, list, tuple, dict)):
      yield from _walk(child, path + (key,), seen)


def leaves(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
  """(dotted path, layer) of each layer of LEAF_TYPES, first path of each, in
  definition order."""
  out, seen = [], set()
  for path, _, _, m in _walk(model):
    if isinstance(m, LEAF_TYPES) and id(m) not in seen:
      seen.add(id(m))
      out.append((".".join(map(str, path)), m))
  return out


class _Probe(StandIn):
  """Stands in for a layer in the traced copy: calls it as one named jit."""

  def __init__(self, layer: nnx.Module, index: int, path: str):
    super().__init__(layer)
    self.index, self.path = index, path

  def __call__(self, x, *args, **kwargs):
    layer = self.layer
    problem = leaf_problem(layer, x, args, kwargs)
    if problem is None:
      def call(x):
        return layer(x, *args, **kwargs)
      call.__name__ = call.__qualname__ = f"{_PREFIX}{self.index}"
      return jax.jit(call)(x)
    if isinstance(layer, OWN_LEAF_TYPES):
      raise ValueError(f"cannot export {self.path} ({type(layer).__name__}): {problem}")
    return layer(x, *args, **kwargs)  # traced operation by operation


def _install_probes(model: nnx.Module) -> list[tuple[str, nnx.Module]]:
  """Replaces every reference to a layer of LEAF_TYPES by its probe; returns the
  layers (path, layer) by probe index."""
  found, probes = [], {}
  for path, parent, key, m in list(_walk(model)):
    if not isinstance(m, LEAF_TYPES) or isinstance(parent, tuple):
      continue  # (a layer in a tuple is traced operation by operation)
    if id(m) not in probes:
      probes[id(m)] = _Probe(m, len(found), ".".join(map(str, path)))
      found.append((probes[id(m)].path, m))
    if isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
      parent[key] = probes[id(m)]
    else:
      setattr(parent, key, probes[id(m)])
  return found


# --- the jaxpr walk ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Reg:
  """A register: its traced shape and dtype, and the shape the program computes
  (``actual``: smaller, numpy-broadcastable, for a broadcast left to its consumer)."""
  name: str
  shape: tuple[int, ...]
  dtype: np.dtype
  actual: tuple[int, ...]


@dataclasses.dataclass(eq=False)
class _Const:
  value: np.ndarray


@dataclasses.dataclass
class Traced:
  """What :func:`trace` returns: the program, its output register, the arrays, and
  one example's output shape."""
  program: list[dict[str, Any]]
  output: str
  arrays: dict[str, np.ndarray]
  out_shape: tuple[int, ...]


def _json(v: Any) -> Any:
  """Attributes as JSON values (tuples -> lists, numpy scalars -> Python)."""
  if isinstance(v, dict):
    return {k: _json(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_json(x) for x in v]
  if isinstance(v, (bool, np.bool_)):
    return bool(v)
  if isinstance(v, (int, np.integer)):
    return int(v)
  if isinstance(v, (float, np.floating)):
    return float(v)
  if isinstance(v, np.dtype) or (isinstance(v, type) and issubclass(v, np.generic)):
    return np.dtype(v).name
  return v


def _squeeze_uniform(c: np.ndarray) -> np.ndarray:
  """``c`` with every axis along which it is constant reduced to size 1 (numpy
  broadcasting restores it at any input size)."""
  for ax in range(c.ndim):
    if c.shape[ax] > 1:
      first = c.take([0], axis=ax)
      same = c == first
      if c.dtype.kind == "f":
        same |= np.isnan(c) & np.isnan(first)
      if np.all(same):
        c = first
  return c


def _source(eqn) -> str:
  """The user's source line of an equation ("" if unknown)."""
  try:  # pylint: disable-next=import-outside-toplevel
    from jax._src import source_info_util
    return source_info_util.summarize(eqn.source_info)
  except Exception:  # pylint: disable=broad-except
    return ""


_LEAF_NAMES = ", ".join(("nnx." if t.__module__.startswith("flax") else "") + t.__name__
                        for t in LEAF_TYPES)


def _scalar(c: Any) -> float | None:
  v = c.value if isinstance(c, _Const) else None
  return None if v is None or v.size != 1 else v.reshape(())


class _Walker:
  """Turns the jaxpr of the probed forward into instructions."""

  def __init__(self, model_name: str, layers: list[tuple[str, nnx.Module]]):
    self.model_name, self.layers = model_name, layers
    self.program: list[dict[str, Any]] = []
    self.arrays: dict[str, np.ndarray] = {}
    self.last_layer: str | None = None
    self._count = 0
    self._consts: dict[Any, _Reg] = {}
    self._keep: list[_Const] = []
    self._packed: dict[str, tuple[str, dict]] = {}
    self._where: list[str] = []  # source lines of the calls being inlined

  # -- emission

  def emit(self, op: str, inputs: list[_Reg], out_shape, out_dtype, actual=None,
           **attrs) -> _Reg:
    out = f"r{self._count}"
    self._count += 1
    self.program.append(dict(op=op, inputs=[r.name for r in inputs], out=out,
                             **_json(attrs)))
    shape = tuple(int(d) for d in out_shape)
    return _Reg(out, shape, np.dtype(out_dtype),
                shape if actual is None else tuple(int(d) for d in actual))

  def operand(self, v: _Reg | _Const, eqn, elementwise: bool) -> _Reg:
    """A register for operand ``v`` (a ``const`` instruction for a constant; squeezed
    to the axes it varies along when the consumer broadcasts)."""
    if isinstance(v, _Reg):
      if not elementwise and v.actual != v.shape:
        raise self.unsupported(eqn, "on a broadcast operand (only elementwise operations "
                               "take one)")
      return v
    c = np.asarray(v.value)
    if c.dtype.name not in REGISTER_DTYPES:
      raise self.unsupported(eqn, f"on a {c.dtype} constant")
    if elementwise:
      c = _squeeze_uniform(c)
    if elementwise and c.size == 1:
      key = ("scalar", c.dtype.name, c.reshape(()).item().__repr__())
      if key not in self._consts:
        self._consts[key] = self.emit("const", [], (), c.dtype, value=c.reshape(()).item(),
                                      dtype=c.dtype.name)
      return self._consts[key]
    key = ("array", id(v), elementwise)
    if key not in self._consts:
      name = f"const{len(self._consts)}"
      stored = c.astype(np.float32)
      if not np.array_equal(stored.astype(c.dtype), c):
        raise self.unsupported(eqn, f"on a {c.dtype} constant that float32 cannot hold")
      self.arrays[f"{name}/value"] = stored
      self._consts[key] = self.emit("const", [], c.shape, c.dtype, name=name,
                                    dtype=c.dtype.name)
      self._keep.append(v)  # keeps id(v) from being reused by another constant
    return self._consts[key]

  def elementwise(self, op: str, eqn, ins: list, **attrs) -> _Reg:
    regs = [self.operand(v, eqn, True) for v in ins]
    actual = np.broadcast_shapes(*[r.actual for r in regs])
    aval = eqn.outvars[0].aval
    return self.emit(op, regs, aval.shape, aval.dtype, actual=actual, **attrs)

  def generic(self, op: str, eqn, ins: list, **attrs) -> _Reg:
    regs = [self.operand(v, eqn, False) for v in ins]
    aval = eqn.outvars[0].aval
    return self.emit(op, regs, aval.shape, aval.dtype, **attrs)

  def unsupported(self, eqn, why: str = "") -> ValueError:
    prim = eqn.primitive.name
    if prim == "ffi_call":
      prim += f"({eqn.params.get('target_name')})"
    shapes = ", ".join(v.aval.str_short() for v in eqn.invars if hasattr(v.aval, "str_short"))
    where = f"after layer '{self.last_layer}'" if self.last_layer else "before any layer"
    source = next((w for w in [_source(eqn)] + self._where[::-1] if w), "")
    where += f", at {source}" if source else ""
    return ValueError(
        f"cannot export {self.model_name}: its forward uses `{prim}` on ({shapes})"
        f"{' ' + why if why else ''} ({where}), which the packed program does not "
        f"express (it expresses calls of {_LEAF_NAMES} and the lax operations of "
        "irnet_jax.export.pack.GENERIC_OPS)")

  # -- the walk

  def run(self, closed: jcore.ClosedJaxpr, input_shape: tuple[int, ...]) -> _Reg:
    x = _Reg(INPUT, input_shape, np.dtype(np.float32), input_shape)
    outs = self.jaxpr(closed.jaxpr, [_Const(np.asarray(c)) for c in closed.consts], [x])
    if len(outs) != 1:
      raise ValueError(f"cannot export {self.model_name}: its forward returns "
                       f"{len(outs)} arrays; pack exports models with one output")
    out = outs[0]
    if not isinstance(out, _Reg) or out.actual != out.shape:
      raise ValueError(f"cannot export {self.model_name}: its output does not depend on "
                       "its input" if isinstance(out, _Const) else
                       f"cannot export {self.model_name}: its output is a broadcast")
    return out

  def jaxpr(self, jaxpr: jcore.Jaxpr, consts: list, args: list) -> list:
    env: dict[Any, Any] = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))

    def read(v):
      if isinstance(v, jcore.Literal):
        return _Const(np.asarray(v.val, v.aval.dtype))
      return env[v]

    consumers = collections.defaultdict(list)
    for i, e in enumerate(jaxpr.eqns):
      for v in e.invars:
        if not isinstance(v, jcore.Literal):
          consumers[v].append(i)
    for v in jaxpr.outvars:
      if not isinstance(v, jcore.Literal):
        consumers[v].append(None)
    done: set[int] = set()

    def only_consumer(v):
      """The one equation reading ``v`` (None if several or an output reads it)."""
      c = consumers.get(v, [])
      return jaxpr.eqns[c[0]] if len(c) == 1 and c[0] is not None else None, (
          c[0] if len(c) == 1 else None)

    ctx = dict(read=read, env=env, done=done, only_consumer=only_consumer)
    for i, eqn in enumerate(jaxpr.eqns):
      if i in done:
        continue
      ins = [read(v) for v in eqn.invars]
      outs = self.eqn(eqn, ins, ctx)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def eqn(self, eqn, ins: list, ctx: dict) -> list:
    prim, params = eqn.primitive.name, eqn.params
    constant = all(isinstance(v, _Const) for v in ins)
    if prim in ("jit", "pjit") and not constant:
      name = str(params.get("name", ""))
      if name.startswith(_PREFIX):
        return [self.layer(eqn, ins)]
      if name == "clip" and len(ins) == 3 and isinstance(ins[0], _Reg) and (
          _scalar(ins[1]) == -1 and _scalar(ins[2]) == 1):
        return [self.elementwise("act", eqn, ins[:1], fn="hardtanh")]
    if prim in _CALLS:  # inlined (on constants alone, that folds it)
      inner = next(params[k] for k in ("jaxpr", "call_jaxpr", "fun_jaxpr") if k in params)
      self._where.append(_source(eqn))
      try:
        if isinstance(inner, jcore.ClosedJaxpr):
          return self.jaxpr(inner.jaxpr, [_Const(np.asarray(c)) for c in inner.consts], ins)
        return self.jaxpr(inner, [], ins)
      finally:
        self._where.pop()
    if constant and not eqn.effects:
      return self.fold(eqn, ins)
    if prim in _IDENTITIES or (prim == "ffi_call"
                               and params.get("target_name") in _IDENTITY_FFI):
      return list(ins)
    handler = getattr(self, f"_{prim}", None)
    if prim in _SIMPLE_UNARY or prim in BINARY_OPS or prim in ("select_n", "clamp"):
      if handler is None:
        return [self.elementwise(prim, eqn, ins)]
    if handler is None:
      raise self.unsupported(eqn)
    out = handler(eqn, ins, ctx)
    return out if isinstance(out, list) else [out]

  def fold(self, eqn, ins: list) -> list:
    """Evaluates an equation on constants."""
    params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, params = params if isinstance(params, tuple) else ((), params)
    out = eqn.primitive.bind(*subfuns, *[c.value for c in ins], **params)
    outs = out if eqn.primitive.multiple_results else [out]
    return [_Const(np.asarray(o)) for o in outs]

  def layer(self, eqn, ins: list) -> _Reg:
    path, module = self.layers[int(eqn.params["name"][len(_PREFIX):])]
    x = self.operand(ins[0], eqn, False)
    if path not in self._packed:  # a layer called twice is packed once
      op, attrs, arrays = pack_leaf(module, path)
      self.arrays.update({f"{path}/{k}": v for k, v in arrays.items()})
      self._packed[path] = op, attrs
    op, attrs = self._packed[path]
    aval = eqn.outvars[0].aval
    self.last_layer = path
    return self.emit(op, [x], aval.shape, aval.dtype, name=path, **attrs)

  # -- primitives with attributes or patterns (handlers: _<primitive name>)

  def _max(self, eqn, ins, ctx):
    if isinstance(ins[0], _Reg) and ins[0].dtype == np.float32:
      zero = _scalar(ins[1])
      if zero is not None and zero == 0 and not np.signbit(zero):
        return self.elementwise("act", eqn, ins[:1], fn="relu")  # jax.nn.relu
    return self.elementwise("max", eqn, ins)

  def _round(self, eqn, ins, ctx):
    return self.elementwise("round", eqn, ins,
                            rounding_method=int(eqn.params["rounding_method"]))

  def _integer_pow(self, eqn, ins, ctx):
    return self.elementwise("integer_pow", eqn, ins, y=int(eqn.params["y"]))

  def _convert_element_type(self, eqn, ins, ctx):
    dtype = np.dtype(eqn.params["new_dtype"])
    if dtype == ins[0].dtype:
      return ins[0]
    if dtype.name not in REGISTER_DTYPES:
      raise self.unsupported(eqn, f"to {dtype}")
    return self.elementwise("convert_element_type", eqn, ins, dtype=dtype.name)

  def _broadcast_in_dim(self, eqn, ins, ctx):
    # Left to the consumer (numpy broadcasting), so that no size is fixed here.
    x, shape, dims = ins[0], eqn.params["shape"], eqn.params["broadcast_dimensions"]
    new_axes = [j for j in range(len(shape)) if j not in dims]
    actual = [1] * len(shape)
    for j, d in zip(dims, x.actual):
      actual[j] = d
    if not new_axes:
      return _Reg(x.name, tuple(shape), x.dtype, tuple(actual))
    return self.emit("expand_dims", [x], shape, x.dtype, actual=actual, axes=new_axes)

  def _reshape(self, eqn, ins, ctx):
    x, shape = ins[0], tuple(eqn.params["new_sizes"])
    if eqn.params.get("dimensions") is not None or not x.shape or not shape or (
        shape[0] != x.shape[0]):
      raise self.unsupported(eqn, "(a reshape must keep the batch axis)")
    trailing = [-1] if len(shape) == 2 else list(shape[1:])  # flatten: any input size
    return self.generic("reshape", eqn, ins, shape=trailing)

  def _squeeze(self, eqn, ins, ctx):
    return self.generic("squeeze", eqn, ins, dimensions=list(eqn.params["dimensions"]))

  def _transpose(self, eqn, ins, ctx):
    return self.generic("transpose", eqn, ins, permutation=list(eqn.params["permutation"]))

  def _slice(self, eqn, ins, ctx):
    shape, p = ins[0].shape, eqn.params
    limit = [None if end == n else int(end) for end, n in zip(p["limit_indices"], shape)]
    return self.generic("slice", eqn, ins, start=list(p["start_indices"]), limit=limit,
                        strides=list(p["strides"]) if p["strides"] else None)

  def _split(self, eqn, ins, ctx):
    x, axis, start = ins[0], int(eqn.params["axis"]), 0
    outs = []
    for v, size in zip(eqn.outvars, eqn.params["sizes"]):
      begin, end = [0] * len(x.shape), [None] * len(x.shape)
      begin[axis] = start
      start += int(size)
      end[axis] = None if start == x.shape[axis] else start
      r = self.operand(x, eqn, False)
      outs.append(self.emit("slice", [r], v.aval.shape, v.aval.dtype, start=begin,
                            limit=end, strides=None))
    return outs

  def _pad(self, eqn, ins, ctx):
    value = _scalar(ins[1])
    if value is None:
      raise self.unsupported(eqn, "with a padding value computed from the input")
    return self.generic("pad", eqn, ins[:1], value=value.item(),
                        padding_config=[list(c) for c in eqn.params["padding_config"]])

  def _concatenate(self, eqn, ins, ctx):
    return self.generic("concatenate", eqn, ins, dimension=int(eqn.params["dimension"]))

  def _reduce_sum(self, eqn, ins, ctx):
    axes = [int(a) for a in eqn.params["axes"]]
    mean = self._mean_pattern(eqn, ins, axes, ctx)
    if mean is not None:
      return mean
    return self.generic("reduce_sum", eqn, ins, axes=axes)

  def _mean_pattern(self, eqn, ins, axes, ctx):
    """``jnp.mean``: reduce_sum [-> keepdims broadcast_in_dim] -> div by the count."""
    x, var = ins[0], eqn.outvars[0]
    div, i = ctx["only_consumer"](var)
    used, keepdims = [i], False
    if div is not None and div.primitive.name == "broadcast_in_dim":
      kept = tuple(d for d in range(len(x.shape)) if d not in axes)
      keep_shape = tuple(1 if d in axes else n for d, n in enumerate(x.shape))
      if (tuple(div.params["broadcast_dimensions"]) == kept
          and tuple(div.params["shape"]) == keep_shape):
        keepdims, var = True, div.outvars[0]
        div, i = ctx["only_consumer"](var)
        used.append(i)
    if div is None or div.primitive.name != "div" or div.invars[0] is not var:
      return None
    try:
      divisor = _scalar(ctx["read"](div.invars[1]))
    except KeyError:  # computed after the sum
      return None
    if divisor is None or divisor != math.prod(x.shape[a] for a in axes):
      return None
    aval = div.outvars[0].aval
    out = self.emit("mean", [self.operand(x, eqn, False)], aval.shape, aval.dtype,
                    axes=axes, keepdims=keepdims)
    ctx["env"][div.outvars[0]] = out
    ctx["done"].update(used)
    return out

  def _reduce(self, eqn, ins, ctx):
    return self.generic(eqn.primitive.name, eqn, ins,
                        axes=[int(a) for a in eqn.params["axes"]])

  _reduce_max = _reduce_min = _reduce_prod = _reduce

  def _reduce_window(self, eqn, ins, ctx):
    p = eqn.params
    attrs = {k: [list(x) for x in p[k]] if k == "padding" else list(p[k])
             for k in ("window_dimensions", "window_strides", "padding", "base_dilation",
                       "window_dilation")}
    win, stride, pad = attrs["window_dimensions"], attrs["window_strides"], attrs["padding"]
    if (eqn.primitive.name == "reduce_window_max" and len(win) == 4
        and win[0] == win[3] == stride[0] == stride[3] == 1 and win[1] == win[2]
        and stride[1] == stride[2] and pad[0] == pad[3] == [0, 0]
        and pad[1] == pad[2] == [pad[1][0]] * 2
        and set(attrs["base_dilation"] + attrs["window_dilation"]) == {1}):
      return self.generic("max_pool", eqn, ins, window=win[1], stride=stride[1],
                          padding=pad[1][0])  # layers.max_pool, nnx.max_pool
    return self.generic(eqn.primitive.name, eqn, ins, **attrs)

  _reduce_window_max = _reduce_window_min = _reduce_window_sum = _reduce_window

  def _check_precision(self, eqn):
    if eqn.params.get("precision") not in (None, jax.lax.Precision.DEFAULT,
                                           (None, None)):
      raise self.unsupported(eqn, f"with precision={eqn.params['precision']}")
    t = eqn.params.get("preferred_element_type")
    return None if t is None else np.dtype(t).name

  def _dot_general(self, eqn, ins, ctx):
    t = self._check_precision(eqn)
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    return self.generic("dot_general", eqn, ins, preferred_element_type=t,
                        dimension_numbers=[[list(lc), list(rc)], [list(lb), list(rb)]])

  def _conv_general_dilated(self, eqn, ins, ctx):
    t, p = self._check_precision(eqn), eqn.params
    dn = p["dimension_numbers"]
    return self.generic(
        "conv_general_dilated", eqn, ins, preferred_element_type=t,
        window_strides=list(p["window_strides"]), padding=[list(x) for x in p["padding"]],
        lhs_dilation=list(p["lhs_dilation"]), rhs_dilation=list(p["rhs_dilation"]),
        dimension_numbers=[list(dn.lhs_spec), list(dn.rhs_spec), list(dn.out_spec)],
        feature_group_count=int(p["feature_group_count"]),
        batch_group_count=int(p["batch_group_count"]))


def trace(model: nnx.Module, input_shape: tuple[int, ...]) -> Traced:
  """The program of ``model``'s eval-mode forward on inputs ``(N, *input_shape)``
  float32 (see the module doc); ``model`` is not changed."""
  clone = nnx.clone(model)
  clone.eval()
  layers = _install_probes(clone)
  name = type(model).__name__
  x = jax.ShapeDtypeStruct((BATCH, *input_shape), jnp.float32)
  try:
    closed = jax.make_jaxpr(lambda x: clone(x))(x)  # pylint: disable=unnecessary-lambda
  except ValueError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"cannot trace {name} on inputs of shape (N, "
                     f"{', '.join(map(str, input_shape))}): {type(e).__name__}: "
                     f"{str(e).splitlines()[0].rstrip('.')}; pass "
                     "pack(..., input_shape=...) if it expects another shape") from e
  walker = _Walker(name, layers)
  out = walker.run(closed, tuple(x.shape))
  return Traced(program=walker.program, output=out.name, arrays=walker.arrays,
                out_shape=out.shape[1:])
