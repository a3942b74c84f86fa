"""Model summary by precision, like ``larq.models.summary``.

``summary(model, input_shape)`` lists every convolution, dense and batch-norm layer
in execution order with its output shape, parameters by precision, MACs and
memory, and totals. ``format_summary`` renders it as a text table.

Conventions:

* **1-bit params**: kernels of convs and dense layers (``BinaryConv``, ``BinaryDense``)
  with binary weights, whatever the method. The per-channel scale is derived from the
  weights and folds into the next BN at deployment, so it is not counted. Everything
  else (FP convs and dense layers, ``nnx.Conv``/``nnx.Linear``, BN scale/bias, biases,
  ReActNet's thresholds and RPReLU) is 32-bit.
* **Binary MACs** are those with *both* operands binary (XNOR + popcount): convs
  with binary weights *and* binary activations. A 1w32a conv (binary weights,
  float activations) counts as float MACs, as do the FP first conv, 1x1 shortcuts
  and the last dense. Conv MACs per image: ``H_out * W_out * kh * kw * in / groups *
  out`` (one per kernel entry and output position); dense: ``in * out``. BN, pooling
  and the shortcuts' adds are not counted.
* **Memory**: "float32" stores every parameter and BN running statistic in 4 bytes;
  "packed" stores 1-bit params in 1 bit (``n / 8`` bytes), the rest in 4 bytes.
  KiB/MiB are 1024-based.

CLI::

    python -m irnet_jax.summary --config=NAME   (or --config=FILE.py)
    python -m irnet_jax.summary --workdir=RUN   (a training run's network, any model)
    python -m irnet_jax.summary --model=resnet18 --image_size=224 --num_classes=1000

Errors are one ``error: ...`` line (``--debug`` or ``IRNET_JAX_DEBUG=1``: the traceback).
"""
from __future__ import annotations

import dataclasses
import math
import sys
import types
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from irnet_jax import layers
from irnet_jax.stand_in import StandIn

_LAYER_TYPES = (layers.BinaryConv, layers.BinaryDense, layers.BatchNorm, nnx.Conv,
                nnx.Linear, nnx.BatchNorm)


@dataclasses.dataclass
class LayerRow:
  """One layer. MACs are per image; memory in bytes; ``output_shape`` None if the
  layer is never called by the forward pass (e.g. ``bn3`` of the ImageNet ResNets)."""
  name: str
  kind: str
  bits: str  # "weights/activations", e.g. "1/1"; "-" for BN.
  output_shape: tuple[int, ...] | None
  params_1bit: int = 0
  params_32bit: int = 0
  batch_stats: int = 0
  macs_binary: int = 0
  macs_float: int = 0

  @property
  def params(self) -> int:
    return self.params_1bit + self.params_32bit

  @property
  def memory_float32(self) -> float:
    return 4.0 * (self.params + self.batch_stats)

  @property
  def memory_packed(self) -> float:
    return self.params_1bit / 8 + 4.0 * (self.params_32bit + self.batch_stats)


def _total(field: str, kind: type = int) -> property:
  """A read-only property: ``field`` of :class:`LayerRow` summed over ``rows``."""
  return property(lambda self: kind(sum(getattr(r, field) for r in self.rows)),
                  doc=f"``{field}`` summed over the rows.")


@dataclasses.dataclass
class Summary:
  """Rows in execution order (unused layers last) and totals over them."""
  model_name: str
  input_shape: tuple[int, ...]
  rows: list[LayerRow]

  params_1bit = _total("params_1bit")
  params_32bit = _total("params_32bit")
  batch_stats = _total("batch_stats")
  macs_binary = _total("macs_binary")
  macs_float = _total("macs_float")

  @property
  def params(self) -> int:
    return self.params_1bit + self.params_32bit

  @property
  def binary_mac_share(self) -> float:
    """Fraction of all MACs that are binary (0 for a model without MACs)."""
    total = self.macs_binary + self.macs_float
    return self.macs_binary / total if total else 0.0

  # Bytes with every parameter and statistic in float32 / with 1-bit params packed.
  memory_float32 = _total("memory_float32", float)
  memory_packed = _total("memory_packed", float)

  @property
  def compression(self) -> float:
    return self.memory_float32 / self.memory_packed if self.memory_packed else 1.0

  def row(self, name: str) -> LayerRow:
    for r in self.rows:
      if r.name == name:
        return r
    raise KeyError(name)


def _size(x) -> int:
  # Works for arrays and for the ShapeDtypeStructs of an abstract model.
  return math.prod(x.shape)


def _count(module: nnx.Module, kind: type) -> int:
  return sum(_size(x) for x in jax.tree.leaves(nnx.state(module, kind)))


# Output shapes: on the copy that nnx.merge builds inside jax.eval_shape, every reference
# to a layer of _LAYER_TYPES is replaced, on its parent, by a _Recorder that calls the
# layer and records its output. Chosen over the alternatives because nothing outside
# that copy changes: flax 0.12's nnx.capture(method_outputs=...) wraps the methods of
# every module *class* for the duration of the call (as the former record_calls did),
# and sow needs code in each layer, which nnx.Conv/nnx.Linear/nnx.BatchNorm lack.


class _Recorder(StandIn):
  """Stands in for ``layer`` in the traced copy: calls it, then ``record(path, output)``."""

  def __init__(self, layer: nnx.Module, path: str, record: Callable[[str, Any], None]):
    super().__init__(layer)
    self.path, self.record = path, record

  def __call__(self, *args, **kwargs):
    out = self.layer(*args, **kwargs)
    self.record(self.path, out)
    return out


def _with_recorders(value: Any, paths: dict[int, str], record, seen: set[int]) -> Any:
  """``value`` with every layer of _LAYER_TYPES below it replaced by a _Recorder:
  modules, nnx.List/nnx.Dict, lists and dicts are edited in place, tuples rebuilt.
  ``paths``: dotted path of each module by id (``nnx.iter_graph``'s first path)."""
  if isinstance(value, _LAYER_TYPES):
    return _Recorder(value, paths[id(value)], record)
  if isinstance(value, tuple):
    new = tuple(_with_recorders(v, paths, record, seen) for v in value)
    return value if all(a is b for a, b in zip(new, value)) else type(value)(new)
  if isinstance(value, (nnx.List, list)):
    items = list(enumerate(value))
  elif isinstance(value, dict):
    items = list(value.items())
  elif isinstance(value, nnx.Module) and id(value) not in seen:
    seen.add(id(value))
    items = [(k, v) for k, v in vars(value).items() if not k.startswith("_pytree__")]
  else:
    return value
  for key, child in items:
    new = _with_recorders(child, paths, record, seen)
    if new is not child:
      if isinstance(value, (nnx.List, list, dict)):
        value[key] = new
      else:
        setattr(value, key, new)
  return value


def _output_shapes(model: nnx.Module, input_shape: Sequence[int]) -> dict[str, tuple]:
  """Output shape of the first call of each layer, in call order, from an abstract
  forward pass of NHWC ``input_shape`` (no FLOPs; ``model`` is not modified)."""
  graphdef, state = nnx.split(model)
  shapes: dict[str, tuple] = {}

  def forward(state):
    m = nnx.merge(graphdef, state)  # new modules: the recorders go on this copy
    paths = {id(n): ".".join(map(str, p)) for p, n in nnx.iter_graph(m)}
    m = _with_recorders(m, paths, lambda path, out: shapes.setdefault(path, out.shape),
                        set())
    m(jnp.zeros(input_shape, jnp.float32))

  jax.eval_shape(forward, state)
  return {path: tuple(shape) for path, shape in shapes.items()}


def _layer_row(name: str, layer: nnx.Module, shape: tuple | None) -> LayerRow:
  n_params = _count(layer, nnx.Param)
  if isinstance(layer, (layers.BatchNorm, nnx.BatchNorm)):
    return LayerRow(name, "BatchNorm", "-", shape, params_32bit=n_params,
                    batch_stats=_count(layer, nnx.BatchStat))
  binary_w = getattr(layer, "binary_weights", False)
  binary_a = getattr(layer, "binary_acts", False)
  if isinstance(layer, (layers.BinaryConv, nnx.Conv)):
    k = layer.kernel_size if isinstance(layer.kernel_size, int) else layer.kernel_size[0]
    kind = f"Conv{k}x{k}"
  else:  # BinaryDense, nnx.Linear: MACs per output position (the last axis).
    kind = "Dense"
  kind += " (binary)" if binary_w or binary_a else ""
  n_w = _size(layer.kernel.get_value()) if binary_w else 0
  row = LayerRow(name, kind, f"{1 if binary_w else 32}/{1 if binary_a else 32}", shape,
                 params_1bit=n_w, params_32bit=n_params - n_w)
  if shape is not None:
    positions = math.prod(shape[1:-1])  # H_out * W_out for convs, 1 for (N, C) dense.
    # Per output position, one MAC per kernel entry: (kh, kw, in / groups, out) HWIO,
    # (in, out) dense, so grouped and depthwise convolutions count right.
    macs = positions * _size(layer.kernel.get_value())
    if binary_w and binary_a:
      row.macs_binary = macs
    else:
      row.macs_float = macs
  return row


def summary(model: nnx.Module, input_shape: Sequence[int] = (1, 32, 32, 3)) -> Summary:
  """Per-layer parameters, MACs and memory of ``model`` for NHWC ``input_shape``.

  Output shapes come from ``jax.eval_shape`` of a forward pass (no compute, the
  model is not modified); ``model`` may be abstract (from ``nnx.eval_shape``), which
  summarizes a large network without allocating its weights. MACs are per image
  whatever the batch size. Parameters of modules that are not conv/dense/BN (none
  in :mod:`irnet_jax.models`) appear in an "(other)" row as 32-bit, so the totals
  always match the model.
  """
  input_shape = tuple(int(d) for d in input_shape)
  shapes = _output_shapes(model, input_shape)
  found = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, _LAYER_TYPES):
      found[".".join(str(p) for p in path)] = node
  order = {p: i for i, p in enumerate(shapes)}
  names = sorted(found, key=lambda n: (order.get(n, len(order)), n))
  rows = [_layer_row(n, found[n], shapes.get(n)) for n in names]
  # Params of any other module type, so that the totals always match the model.
  other = _count(model, nnx.Param) - sum(r.params for r in rows)
  if other:
    rows.append(LayerRow("(other)", "-", "32/32", None, params_32bit=other))
  return Summary(type(model).__name__, input_shape, rows)


def _fmt_int(n: int) -> str:
  return f"{n:,}" if n else "0"


def format_summary(s: Summary) -> str:
  """Text table of :func:`summary`: one row per layer, then totals."""
  header = ("Layer", "Type", "W/A bits", "Output shape", "1-bit params", "32-bit params",
            "Mem fp32 KiB", "Mem packed KiB", "Binary MACs", "Float MACs")
  body = []
  for r in s.rows:
    shape = "unused" if r.output_shape is None else str(tuple(r.output_shape))
    body.append((r.name, r.kind, r.bits, shape, _fmt_int(r.params_1bit),
                 _fmt_int(r.params_32bit), f"{r.memory_float32 / 1024:.2f}",
                 f"{r.memory_packed / 1024:.2f}", _fmt_int(r.macs_binary),
                 _fmt_int(r.macs_float)))
  total = ("Total", "", "", "", _fmt_int(s.params_1bit), _fmt_int(s.params_32bit),
           f"{s.memory_float32 / 1024:.2f}", f"{s.memory_packed / 1024:.2f}",
           _fmt_int(s.macs_binary), _fmt_int(s.macs_float))
  widths = [max(len(str(row[i])) for row in [header, total, *body])
            for i in range(len(header))]
  left = {0, 1, 3}  # Text columns; numbers are right-aligned.

  def line(row):
    return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                     for i, (c, w) in enumerate(zip(row, widths))).rstrip()

  rule = "-" * len(line(header))
  mib = 1024.0 ** 2
  out = [f"Model: {s.model_name}    input: {s.input_shape} (NHWC), MACs per image",
         rule, line(header), rule, *map(line, body), rule, line(total), rule,
         f"Total params:          {s.params:,}  (1-bit {s.params_1bit:,}, "
         f"32-bit {s.params_32bit:,}); BN running stats {s.batch_stats:,}",
         f"Memory float32:        {s.memory_float32 / mib:.3f} MiB",
         f"Memory packed (1-bit): {s.memory_packed / mib:.3f} MiB  "
         f"(compression x{s.compression:.2f})",
         f"MACs:                  binary {s.macs_binary:,} | float {s.macs_float:,} | "
         f"binary share {100 * s.binary_mac_share:.2f}%"]
  return "\n".join(out)


# ----------------------------------------------------------------------------------
# CLI.


_MODEL_KEYS = ("num_classes", "weight_bits", "act_bits", "estimator", "weight_quantizer",
               "structure")


def _dataset_classes(name: str) -> int | None:
  """The class count the data source table fixes for ``name`` (None: from the data,
  an unknown name, or no input pipeline installed)."""
  try:
    from irnet_jax.data import sources  # pylint: disable=import-outside-toplevel
    return sources.source_spec(name).num_classes
  except (ImportError, ValueError):  # no [train] extra; an unknown name
    return None


def _config_kwargs(config) -> tuple[str, dict, int | None]:
  """(model name, ``models.create`` kwargs, image size) of a training config."""
  mc = config.model
  kw = {k: mc[k] for k in _MODEL_KEYS if k in mc and mc[k] not in (None, "")}
  dataset = config.get("dataset", {})
  if kw.get("num_classes", 0) <= 0:  # -1: "from the dataset", without reading it
    kw.pop("num_classes", None)
    name = dataset.get("name", "")
    num_classes = _dataset_classes(name)
    if num_classes:
      kw["num_classes"] = num_classes
    else:  # From the data (e.g. npz): the model's default; --num_classes sets it.
      print(f"note: num_classes of dataset {name!r} unknown; using the model default")
  return mc.name, kw, dataset.get("image_size")


def _model_from_flags() -> tuple[str, dict, int]:
  """(model name, ``models.create`` kwargs, image size): ``--config``'s, overridden by
  the model flags given on the command line."""
  # pylint: disable=import-outside-toplevel  # Only the command line needs these.
  from absl import flags

  from irnet_jax import config as config_lib
  from irnet_jax import models

  f = flags.FLAGS
  name, kw, image_size = f.model, {}, None
  if f.config is not None:
    config_lib.check_fields(f.config)  # A typo in the config file: one line, nearest field.
    name, kw, image_size = _config_kwargs(f.config)
  for key in _MODEL_KEYS:
    if f[key].present:
      kw[key] = f[key].value
  if f["model"].present:
    name = f.model
  if f["image_size"].present or not image_size:
    if not (f.image_size or not models.is_factory(name)):
      raise ValueError(f"--image_size is needed for {name!r} (a user's network has no "
                       "registry input size)")
    image_size = f.image_size or models.spec(name).input_size
  return name, kw, image_size


def main(argv: Sequence[str]) -> None:
  """Prints the summary table of the model the flags describe."""
  del argv  # cli.run refuses positional arguments.
  # pylint: disable=import-outside-toplevel
  from absl import flags

  from irnet_jax import config as config_lib
  from irnet_jax import models

  if flags.FLAGS.workdir:  # A training run's network, as its config.json records it.
    from irnet_jax import run_record
    c = run_record.load_config(flags.FLAGS.workdir)
    size = int(flags.FLAGS.image_size or c.dataset.image_size)
    model = nnx.eval_shape(lambda: config_lib.build_model(c, conv_impl="xla"))
    print(format_summary(summary(model, (1, size, size, 3))))
    return
  name, kw, image_size = _model_from_flags()
  c = flags.FLAGS.config
  if c is not None and (models.is_factory(name) or c.model.get("binarize")):
    # A user's network or a binarized one: built exactly as the launcher builds it.
    c.model.name, c.model.num_classes = name, kw.get("num_classes", c.model.num_classes)
    model = nnx.eval_shape(lambda: config_lib.build_model(c, conv_impl="xla"))
  else:
    model = nnx.eval_shape(lambda: models.create(name, **kw))  # Shapes only.
  print(format_summary(summary(model, (1, image_size, image_size, 3))))


def define_flags() -> None:
  # pylint: disable=import-outside-toplevel
  from absl import flags

  from irnet_jax import configs

  configs.define_flag("config", "Training config: a packaged recipe's name "
                      "(python -m irnet_jax.main --list-configs) or a config file's path.",
                      lock_config=False)
  flags.DEFINE_string("workdir", None, "A training run's --workdir: summarize its network "
                      "(any model, binarized or not) as its config.json says.")
  flags.DEFINE_string("model", "resnet20", "Model name (irnet_jax.models.REGISTRY).")
  flags.DEFINE_integer("image_size", None, "Input height = width; default: the model's.")
  flags.DEFINE_integer("num_classes", None, "Number of classes; default: the model's.")
  flags.DEFINE_integer("weight_bits", None, "1 or 32.")
  flags.DEFINE_integer("act_bits", None, "1 or 32.")
  flags.DEFINE_string("estimator", None, "ede, ste or approx_sign.")
  flags.DEFINE_string("weight_quantizer", None, "libra_pb, sign or none.")
  flags.DEFINE_string("structure", None, "bireal or plain.")


class _CallableModule(types.ModuleType):
  """Lets ``irnet_jax.summary(model)`` call :func:`summary` while ``python -m
  irnet_jax.summary`` still runs this module."""

  def __call__(self, model: nnx.Module, input_shape=(1, 32, 32, 3)) -> Summary:
    return summary(model, input_shape)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
  from irnet_jax import cli

  cli.run(main, define_flags)


__all__ = ["summary", "format_summary", "Summary", "LayerRow"]
