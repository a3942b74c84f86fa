"""Binarize any Flax NNX model: :func:`binarize_model`, and EDE's progress for any model.

``binarize_model(model, "irnet")`` replaces every ``nnx.Conv`` and ``nnx.Linear`` (and
the library's full-precision ``BinaryConv``/``BinaryDense``) by the binary layer of the
method (:mod:`irnet_jax.methods`) holding the *same* parameter arrays, so a float
checkpoint initializes it, except the layers the method keeps real-valued (first conv,
last linear, strided 1x1 "downsample" convs) and those ``keep`` names. The registry's
binary networks are exactly this applied to their float twins (tests/test_binarize.py).

``set_progress(model, p)`` sets EDE's (t, k) (IR-Net Eq. 12) in every binary layer from
training progress ``p`` in [0, 1]; the launcher's train step calls it, inside ``jit``,
before every forward pass. Layers are visited in definition order (the order the
module's ``__init__`` assigned them), which is what "first" and "last" mean here.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from irnet_jax import layers, methods, ops

Keep = Sequence[str] | Callable[[str, nnx.Module], bool] | None


@dataclasses.dataclass(frozen=True)
class Row:
  """One candidate layer: dotted path, class name, kernel shape, "binary"/"kept", why."""
  path: str
  kind: str
  shape: tuple[int, ...]
  action: str
  why: str


@dataclasses.dataclass(frozen=True)
class Report:
  """What :func:`binarize_model` did, one :class:`Row` per conv/dense layer."""
  method: str
  rows: tuple[Row, ...]

  @property
  def binary(self) -> list[str]:
    return [r.path for r in self.rows if r.action == "binary"]

  @property
  def kept(self) -> list[str]:
    return [r.path for r in self.rows if r.action == "kept"]

  def __str__(self) -> str:
    head = ("layer", "kind", "kernel", "result", "why")
    body = [(r.path, r.kind, "x".join(map(str, r.shape)), r.action, r.why)
            for r in self.rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(4)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    lines = [f"binarize_model(method={self.method!r}): {len(self.binary)} binary, "
             f"{len(self.kept)} kept real-valued", fmt.format(*head)]
    lines += [fmt.format(*x) for x in body]
    return "\n".join(lines)


def _children(module: object) -> Iterator[tuple[object, object]]:
  """(key, child) in definition order; keys index ``nnx.List`` items as ints."""
  if isinstance(module, nnx.List):
    yield from enumerate(module)
  elif isinstance(module, (list, tuple)):
    yield from enumerate(module)
  elif isinstance(module, dict):
    yield from module.items()
  elif isinstance(module, nnx.Module):
    for key, value in vars(module).items():
      if not key.startswith("_"):
        yield key, value


def _walk(module: object, path: tuple = ()
          ) -> Iterator[tuple[tuple, object, object, nnx.Module]]:
  """(path, parent, key, submodule) of every submodule, depth first in definition order."""
  for key, child in _children(module):
    if isinstance(child, nnx.Module):
      yield path + (key,), module, key, child
    if isinstance(child, (nnx.Module, list, tuple, dict)):
      yield from _walk(child, path + (key,))


_CONVS = (nnx.Conv, layers.BinaryConv)
_DENSES = (nnx.Linear, layers.BinaryDense)


def _is_float_binary_layer(m: nnx.Module) -> bool:
  return isinstance(m, (layers.BinaryConv, layers.BinaryDense)) and not (
      m.binary_weights or m.binary_acts)


def _symmetric_padding(conv: nnx.Conv) -> int | None:
  """nnx.Conv's padding as BinaryConv's symmetric integer, or None if it has none."""
  (kh, kw), pad = conv.kernel_size, conv.padding
  strides = conv.strides if isinstance(conv.strides, Sequence) else (conv.strides,) * 2
  if pad == "VALID":
    return 0
  if pad == "SAME":  # XLA pads SAME asymmetrically unless stride 1 and an odd kernel.
    return kh // 2 if kh == kw and kh % 2 == 1 and tuple(strides) == (1, 1) else None
  if isinstance(pad, int):
    return pad
  flat = {p for pair in pad for p in (pair if isinstance(pair, Sequence) else (pair,) * 2)}
  return flat.pop() if len(flat) == 1 else None


def _unsupported(m: nnx.Module) -> str | None:
  """Why a float conv cannot become a BinaryConv (None: it can)."""
  if not isinstance(m, nnx.Conv):
    return None
  if len(m.kernel_size) != 2 or m.kernel_size[0] != m.kernel_size[1]:
    return f"kernel {m.kernel_size}: binary convs are square 2D"
  strides = m.strides if isinstance(m.strides, Sequence) else (m.strides,) * 2
  if len(set(strides)) != 1:
    return f"strides {m.strides}: binary convs take one stride"
  if m.feature_group_count != 1:
    return "grouped/depthwise conv: binary convs are dense"
  if {m.kernel_dilation, m.input_dilation} - {1, (1, 1)}:
    return "dilated conv: not supported by binary convs"
  if _symmetric_padding(m) is None:
    return (f"padding={m.padding!r} with strides={m.strides} is asymmetric in XLA; "
            f"binary convs pad symmetrically (give the conv an integer padding)")
  return None


def _binary_twin(m: nnx.Module, method: methods.Method, conv_impl: str) -> nnx.Module:
  """The method's binary layer with ``m``'s parameter arrays."""
  kw = method.layer_kwargs()
  bias = getattr(m, "bias", None)
  rngs = nnx.Rngs(0)  # Only for the init the copied kernel replaces.
  if isinstance(m, nnx.Conv):
    strides = m.strides if isinstance(m.strides, int) else m.strides[0]
    new = layers.BinaryConv(m.in_features, m.out_features, m.kernel_size[0],
                            strides=strides, padding=_symmetric_padding(m),
                            use_bias=bias is not None, dtype=m.dtype,
                            param_dtype=m.param_dtype, conv_impl=conv_impl, rngs=rngs, **kw)
  elif isinstance(m, layers.BinaryConv):
    new = layers.BinaryConv(m.in_features, m.out_features, m.kernel_size,
                            strides=m.strides, padding=m.padding,
                            use_bias=bias is not None, dtype=m.dtype,
                            param_dtype=m.kernel.dtype, conv_impl=m.conv_impl, rngs=rngs,
                            **kw)
  else:  # nnx.Linear or a float BinaryDense.
    new = layers.BinaryDense(m.in_features, m.out_features, use_bias=bias is not None,
                             dtype=m.dtype, param_dtype=m.kernel.dtype, rngs=rngs, **kw)
  new.kernel = m.kernel
  if bias is not None:
    new.bias = bias
  return new


def _keep_reason(path: str, m: nnx.Module, first_conv: str | None,
                 last_dense: str | None, rules: Sequence[str], keep: Keep) -> str | None:
  if keep is not None:
    if callable(keep) and keep(path, m):
      return "keep predicate"
    if not callable(keep) and any(path == k or path.startswith(k + ".") for k in keep):
      return "named in keep"
  if "first_conv" in rules and path == first_conv:
    return "first conv (sees the image)"
  if "last_linear" in rules and path == last_dense:
    return "last linear (makes the logits)"
  if "downsample" in rules and isinstance(m, _CONVS):
    k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0]
    s = m.strides if isinstance(m.strides, int) else m.strides[0]
    if (k == 1 and s > 1) or any(w in path for w in ("downsample", "shortcut")):
      return "residual downsample"
  return _unsupported(m)


def binarize_model(model: nnx.Module, method: str = "irnet", *, keep: Keep = None,
                   keep_rules: Sequence[str] | None = None,
                   conv_impl: str | None = None) -> tuple[nnx.Module, Report]:
  """Replaces ``model``'s float convs and dense layers by binary ones, in place.

  Args:
    model: any NNX module; its ``nnx.Conv`` (2D, NHWC, kernel HWIO) and ``nnx.Linear``
      layers, and the library's float ``BinaryConv``/``BinaryDense``, are candidates.
    method: a name of :data:`irnet_jax.methods.METHODS`.
    keep: dotted paths (a layer or a prefix of layers, e.g. ``"head"``) or a predicate
      ``(path, module) -> bool`` naming more layers to keep real-valued.
    keep_rules: the automatic rules (:data:`methods.KEEP_RULES`); None: the method's.
    conv_impl: the resolved convolution backend of new convs (None: the model's
      ``conv_impl`` attribute, else "xla").

  Returns:
    ``(model, report)``: the same object, changed, and what happened to each layer.
  """
  spec = methods.get(method)
  rules = spec.keep if keep_rules is None else tuple(keep_rules)
  conv_impl = conv_impl or getattr(model, "conv_impl", "xla")
  found = [w for w in _walk(model) if isinstance(w[3], _CONVS + _DENSES)]
  dotted = lambda p: ".".join(map(str, p))  # noqa: E731
  first_conv = next((dotted(p) for p, _, _, m in found if isinstance(m, _CONVS)), None)
  last_dense = next((dotted(p) for p, _, _, m in reversed(found)
                     if isinstance(m, _DENSES)), None)
  rows = []
  for p, parent, key, m in found:
    path, shape = dotted(p), tuple(m.kernel.shape)
    if isinstance(m, (layers.BinaryConv, layers.BinaryDense)) and not _is_float_binary_layer(m):
      rows.append(Row(path, type(m).__name__, shape, "binary", "already binary"))
      continue
    why = _keep_reason(path, m, first_conv, last_dense, rules, keep)
    if why is not None:
      rows.append(Row(path, type(m).__name__, shape, "kept", why))
      continue
    new = _binary_twin(m, spec, conv_impl)
    if isinstance(parent, (nnx.List, list, dict)):
      parent[key] = new
    else:
      setattr(parent, key, new)
    rows.append(Row(path, f"{type(m).__name__}->{type(new).__name__}", shape, "binary",
                    spec.name))
  return model, Report(spec.name, tuple(rows))


def binary_layers(model: nnx.Module) -> dict[str, nnx.Module]:
  """Every BinaryConv/BinaryDense with binary weights or inputs, by dotted path."""
  return {".".join(map(str, p)): m for p, m in nnx.iter_graph(model)
          if isinstance(m, (layers.BinaryConv, layers.BinaryDense))
          and not _is_float_binary_layer(m)}


def set_ede(model: nnx.Module, ede: ops.EDE) -> None:
  """Sets (t, k) in every layer that binarizes with EDE (may be traced values), in the
  dtype of each layer's kernel."""
  for _, m in nnx.iter_graph(model):
    if isinstance(m, (layers.BinaryConv, layers.BinaryDense)) and m.ede_t is not None:
      dtype = m.kernel.dtype  # float64 weights: a float64 EDE backward.
      m.ede_t.set_value(jnp.asarray(ede.t, dtype))  # Not [...]=: it may be abstract.
      m.ede_k.set_value(jnp.asarray(ede.k, dtype))


def set_progress(model: nnx.Module, progress: jax.Array | float, t_min: float = 0.1,
                 t_max: float = 10.0) -> ops.EDE:
  """EDE's schedule (:func:`ops.ede_schedule`) at ``progress`` in [0, 1], set in every
  binary layer of ``model``; returns the (t, k) it set. Call it before the forward pass
  of each training step (inside ``jit`` is fine: one compilation for the whole run)."""
  ede = ops.ede_schedule(progress, t_min, t_max)
  set_ede(model, ede)
  return ede
