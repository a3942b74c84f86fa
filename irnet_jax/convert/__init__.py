"""Official PyTorch state_dict <-> NNX state, for every model in :mod:`irnet_jax.models`.

The models name their submodules like the official code (``conv1``, ``bn1``,
``layer2.0.conv1``, ``layer2.0.shortcut.0``, ``downsample.1``, ``linear``, ``fc``),
so a state path maps to a torch key by joining it with dots and renaming the leaf:

=================  ==================  ==========================================
NNX leaf           torch leaf          layout
=================  ==================  ==========================================
conv ``kernel``    ``weight``          HWIO  <->  OIHW
dense ``kernel``   ``weight``          (in, out)  <->  (out, in)
``bias``           ``bias``            same
BN ``scale``       ``weight``          same
BN ``mean``        ``running_mean``    same
BN ``var``         ``running_var``     same
=================  ==================  ==========================================

``num_batches_tracked`` is accepted and ignored on load (it only matters to torch
BN with ``momentum=None``) and written as 0 on export. Dtypes are kept: float64
weights stay float64 when ``jax_enable_x64`` is on.

The official trainers save ``{'state_dict': model.state_dict(), 'best_prec1': ...}``
with the model wrapped in ``nn.DataParallel``, so every key starts with ``module.``;
:func:`official_state_dict` (applied by :func:`load_torch_state_dict`) unwraps both.
Whole workdirs: :mod:`irnet_jax.convert.workdir`; the command line
(``python -m irnet_jax.convert``, the only part that needs torch):
:mod:`irnet_jax.convert.__main__`.
"""
from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from irnet_jax import binarize, ops

# EDE's (t, k) (layers.EDEState): plain attributes in the official code, not state.
_NOT_IN_TORCH = ("ede_t", "ede_k")
_LEAF_TO_TORCH = {"kernel": "weight", "bias": "bias", "scale": "weight",
                  "mean": "running_mean", "var": "running_var"}
_IGNORED_LEAVES = ("num_batches_tracked",)
WRAPPER_KEYS = ("state_dict", "model")  # Entries of checkpoint dicts that hold the weights.
_PARALLEL_PREFIX = "module."  # nn.DataParallel / DistributedDataParallel.


def official_state_dict(obj: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
  """``(state_dict, extras)`` of what ``torch.load`` returned for an official file.

  Takes the ``state_dict`` (or ``model``) entry of a checkpoint dict if there is one
  (the other entries, e.g. ``best_prec1``, ``epoch``, are returned as ``extras``, as
  Python scalars where they are scalars; others are dropped), and strips one leading
  ``module.`` if every key has it. A bare state_dict passes through unchanged.
  """
  extras: dict[str, Any] = {}
  for key in WRAPPER_KEYS:
    if isinstance(obj.get(key), Mapping):
      extras = {k: _scalar(v) for k, v in obj.items() if k != key}
      extras = {k: v for k, v in extras.items() if v is not None}
      obj = obj[key]
      break
  sd = dict(obj)
  if sd and all(k.startswith(_PARALLEL_PREFIX) for k in sd):
    sd = {k[len(_PARALLEL_PREFIX):]: v for k, v in sd.items()}
  return sd, extras


def _scalar(value: Any) -> Any:
  """A JSON-able Python scalar of ``value`` (number, string, 1-element array), else None."""
  if isinstance(value, (bool, int, float, str)):
    return value
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except
    return None
  return array.item() if array.size == 1 and array.dtype.kind in "biuf" else None


def torch_key(path: tuple) -> str:
  """NNX state path (e.g. ``('layer1', 0, 'bn1', 'mean')``) -> torch key."""
  *prefix, leaf = (str(p) for p in path)
  if leaf not in _LEAF_TO_TORCH:
    raise ValueError(f"state path {'.'.join(map(str, path))} has no PyTorch counterpart")
  return ".".join([*prefix, _LEAF_TO_TORCH[leaf]])


def _relayout(value: np.ndarray, conv_axes: tuple[int, int, int, int]) -> np.ndarray:
  """4-d kernels transposed by ``conv_axes``, 2-d ones transposed; others unchanged."""
  if value.ndim == 4:
    return np.transpose(value, conv_axes)
  return value.T if value.ndim == 2 else value


def to_torch_layout(value: np.ndarray) -> np.ndarray:
  """Flax kernel layout -> torch: HWIO -> OIHW, (in, out) -> (out, in); others unchanged."""
  return _relayout(value, (3, 2, 0, 1))


def from_torch_layout(value: np.ndarray) -> np.ndarray:
  """torch layout -> Flax: OIHW -> HWIO, (out, in) -> (in, out); others unchanged."""
  return _relayout(value, (2, 3, 1, 0))


def _flat_variables(state: Any) -> Iterator[tuple[tuple, Any]]:
  """(path, leaf value) for every variable of an ``nnx.State`` (or a sub-state)."""
  for path, leaf in nnx.to_flat_state(state):
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    yield tuple(path), value


def to_torch_state_dict(state: Any) -> dict[str, np.ndarray]:
  """An ``nnx.State`` (model state, a sub-state or gradients) -> torch-keyed numpy dict.

  Example: ``to_torch_state_dict(nnx.state(model))``, or the gradients returned by
  ``nnx.grad``. BN layers whose running mean is present also get
  ``num_batches_tracked = 0`` so that ``torch.load_state_dict`` accepts the dict.
  """
  out: dict[str, np.ndarray] = {}
  for path, value in _flat_variables(state):
    if str(path[-1]) in _NOT_IN_TORCH:
      continue
    key = torch_key(path)
    out[key] = to_torch_layout(np.asarray(value))
    if str(path[-1]) == "mean":
      out[key.rsplit(".", 1)[0] + ".num_batches_tracked"] = np.array(0, np.int64)
  return out


def load_torch_state_dict(model: nnx.Module, state_dict: Mapping[str, Any]) -> nnx.Module:
  """Loads an official state_dict (torch key -> array-like) into ``model`` in place.

  ``state_dict`` may also be an official checkpoint dict (``{'state_dict': ...,
  'best_prec1': ...}``) and its keys may carry DataParallel's ``module.`` prefix
  (see :func:`official_state_dict`). Checks everything before changing anything: every
  parameter and BN statistic of the model must be present with the right shape, and no
  unknown key may remain;
  otherwise a ``ValueError`` lists the offending keys. Tensors are converted with
  ``np.asarray`` (pass ``t.detach().cpu().numpy()`` for torch tensors).

  Returns the model, for chaining.
  """
  arrays = {k: np.asarray(v) for k, v in official_state_dict(state_dict)[0].items()}
  targets = {}
  for path, value in _flat_variables(nnx.state(model, (nnx.Param, nnx.BatchStat))):
    targets[torch_key(path)] = (path, tuple(value.shape))
  unknown = sorted(k for k in arrays
                   if k not in targets and k.rsplit(".", 1)[-1] not in _IGNORED_LEAVES)
  missing = sorted(k for k in targets if k not in arrays)
  bad_shape = []
  for key, (path, shape) in targets.items():
    if key in arrays:
      got = from_torch_layout(arrays[key]).shape
      if tuple(got) != shape:
        bad_shape.append(f"{key}: expected torch shape "
                         f"{to_torch_layout(np.empty(shape)).shape}, got {arrays[key].shape}")
  problems = []
  if unknown:
    problems.append(f"unknown keys (not in {type(model).__name__}): {unknown}")
  if missing:
    problems.append(f"missing keys: {missing}")
  if bad_shape:
    problems.append("mis-shaped keys: " + "; ".join(bad_shape))
  if problems:
    raise ValueError("state_dict does not match the model: " + " | ".join(problems) +
                     ". Check that the model was built with the same name, num_classes "
                     "and structure as the checkpoint.")
  by_path = {path: key for key, (path, _) in targets.items()}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, (nnx.Param, nnx.BatchStat)) and tuple(path) in by_path:
      node.set_value(jnp.asarray(from_torch_layout(arrays[by_path[tuple(path)]])))
  # EDE's (t, k) are not in a state_dict (the official code keeps them in module
  # attributes): give them values, so an abstract model (nnx.eval_shape) becomes concrete.
  binarize.set_ede(model, ops.DEFAULT_EDE)
  return model


__all__ = ["load_torch_state_dict", "to_torch_state_dict", "official_state_dict", "torch_key",
           "to_torch_layout", "from_torch_layout"]
