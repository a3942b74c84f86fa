"""Inputs of the golden files (tests/golden/*.npz): weights and images from a counter hash.

Numpy only, shared by the generator (``experiments/make_golden.py``, which feeds them to
the PyTorch reference) and the suite (``tests/test_golden.py``, which feeds them to the
JAX models). Storing them would take tens of MB in float64 (ResNet-34 has 21M
parameters), so each value is a pure function of (seed, tensor name, index) computed
with integer arithmetic only (splitmix64), independent of numpy's random streams and
of the numpy version. Each golden file stores the sha256 of the inputs it was made
from (:func:`checksum`), so a change here fails loudly instead of silently comparing
different networks.

Weights (torch layout and key names, e.g. OIHW conv kernels):
  * conv / linear weights: uniform with the variance of He init, ``std = sqrt(2 / fan_in)``
    (linear: ``sqrt(1 / fan_in)``);
  * BN (perturbed so that every statistic matters): ``weight`` U(0.5, 1.5), ``bias``
    U(-0.3, 0.3), ``running_mean`` U(-0.3, 0.3), ``running_var`` U(0.5, 2.0),
    ``num_batches_tracked`` 0;
  * linear ``bias`` U(-0.1, 0.1).
Images: NCHW, uniform with unit variance.
"""
from __future__ import annotations

import hashlib
import zlib
from typing import Mapping, Sequence

import numpy as np

_MASK = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
  z = z + np.uint64(0x9E3779B97F4A7C15)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def uniform(name: str, seed: int, shape: Sequence[int], low: float, high: float
            ) -> np.ndarray:
  """float64 array of ``shape``, U[low, high), a pure function of (seed, name, index)."""
  n = int(np.prod(shape, dtype=np.int64))
  stream = np.uint64(zlib.crc32(f"{seed}/{name}".encode()))
  with np.errstate(over="ignore"):  # uint64 arithmetic wraps, as intended.
    counter = (stream << np.uint64(32)) + np.arange(n, dtype=np.uint64)
    bits = _splitmix64(counter & _MASK)
  unit = (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # 53 random bits.
  return (low + (high - low) * unit).reshape(tuple(shape))


def _tensor(key: str, shape: Sequence[int], seed: int, is_bn: bool) -> np.ndarray:
  leaf = key.rsplit(".", 1)[-1]
  if leaf == "num_batches_tracked":
    return np.zeros(shape, np.int64)
  if len(shape) >= 2:  # conv (O, I, kh, kw) or linear (out, in) weight
    fan_in = int(np.prod(shape[1:]))
    bound = np.sqrt(3.0) * np.sqrt((2.0 if len(shape) == 4 else 1.0) / fan_in)
    return uniform(key, seed, shape, -bound, bound)
  low, high = {"weight": (0.5, 1.5), "running_var": (0.5, 2.0), "running_mean": (-0.3, 0.3),
               "bias": (-0.3, 0.3)}[leaf]
  if leaf == "bias" and not is_bn:
    low, high = -0.1, 0.1  # The linear layer's bias.
  return uniform(key, seed, shape, low, high)


def state_dict(spec: Sequence[tuple[str, Sequence[int]]], seed: int) -> dict[str, np.ndarray]:
  """Torch-keyed weights for ``spec`` = [(key, torch shape), ...] of a model's state_dict."""
  bn = {key.rsplit(".", 1)[0] for key, _ in spec if key.endswith(".running_mean")}
  return {key: _tensor(key, tuple(shape), seed, key.rsplit(".", 1)[0] in bn)
          for key, shape in spec}


def images(shape: Sequence[int], seed: int) -> np.ndarray:
  """NCHW float64 images, uniform with unit variance."""
  return uniform("images", seed, shape, -np.sqrt(3.0), np.sqrt(3.0))


def probe(key: str, shape: Sequence[int]) -> np.ndarray:
  """A fixed U(-1, 1) tensor; ``sum(g * probe)`` pins where the mass of a large ``g`` is
  (a transposed or permuted gradient has the same sum and norm, not the same probe)."""
  return uniform(f"probe/{key}", 0, shape, -1.0, 1.0)


def summary(key: str, value: np.ndarray) -> np.ndarray:
  """``[sum, L2 norm, sum(value * probe)]`` of a tensor, float64."""
  v = np.asarray(value, np.float64)
  return np.array([v.sum(), np.sqrt(np.square(v).sum()), (v * probe(key, v.shape)).sum()])


def checksum(weights: Mapping[str, np.ndarray], x: np.ndarray) -> str:
  """sha256 over the weights (sorted by key) and the images."""
  h = hashlib.sha256()
  for key in sorted(weights):
    h.update(key.encode())
    h.update(np.ascontiguousarray(weights[key]).tobytes())
  h.update(np.ascontiguousarray(x).tobytes())
  return h.hexdigest()
