"""Model registry: ``models.create(name, **kw)`` and one :class:`ModelSpec` per name.

Names: "resnet20", "resnet18_cifar", "vgg_small" (CIFAR, 32x32 inputs) and
"resnet18", "resnet34" (ImageNet). Keyword arguments common to all:
``num_classes``, ``weight_bits`` (1 or 32), ``act_bits`` (1 or 32),
``estimator`` ("ede", "ste", "approx_sign"), ``weight_quantizer`` ("libra_pb",
"sign", "none"), ``structure`` ("bireal", "plain"; ignored by VGG), ``dtype``,
``param_dtype`` and ``rngs``. ``weight_bits=act_bits=32`` gives the
full-precision twin of each network (same structure, hardtanh kept).

"resnet20_1w32a", "resnet18_1w32a" and "resnet34_1w32a" are the official weight-only
networks, which differ in structure (plain blocks, ReLU); see their docstrings.
``activation`` ("hardtanh" or "relu") can also be set on any ResNet.

``conv_impl`` ("auto", "xla", "xla_cpu", "avx512") chooses how the convolutions run;
``create`` resolves it once (:func:`irnet_jax.kernels.resolve`) for ``devices`` (default:
JAX's default device) and the model keeps the result as ``model.conv_impl``. The
model classes themselves take a resolved name (default "xla").

A user's network is named ``"package.module:factory"`` (:func:`create` calls it); adding
a model to the registry = one :class:`ModelSpec` in :data:`REGISTRY`. Everything else reads it:
the config check, ``python -m irnet_jax.summary`` and the test lists. Export needs
nothing from a model: it traces the forward (:mod:`irnet_jax.export.trace`).
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib
from typing import Callable, Sequence

import jax
from flax import nnx

from irnet_jax import kernels
from irnet_jax.models.resnet_cifar import CifarResNet, resnet18_cifar, resnet20, resnet20_1w32a
from irnet_jax.models.resnet_imagenet import (
  ImageNetResNet,
  resnet18,
  resnet18_1w32a,
  resnet34,
  resnet34_1w32a,
)
from irnet_jax.models.vgg_small import VGGSmall, vgg_small


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """Everything the library knows about one registered model.

  Attributes:
    name: the registry key (``config.model.name``).
    build: constructor ``build(*, rngs, **kw) -> nnx.Module``; its defaults are the
      official network's (e.g. ``act_bits=32`` for the ``*_1w32a`` names).
    family: the class ``build`` returns.
    input_size: the input height = width the network is designed for (pixels).
    min_input_size: the smallest input it is meant for (tests run there): the CIFAR
      ResNets' global average pool takes any size; the ImageNet ResNets' five
      stride-2 stages want >= 32 (smaller inputs leave 1x1 maps whose BatchNorm
      statistics over a tiny batch are degenerate); VGG-Small's classifier fixes 32.
  """
  name: str
  build: Callable[..., nnx.Module]
  family: type[nnx.Module]
  input_size: int
  min_input_size: int


_SPECS = (
    ModelSpec("resnet20", resnet20, CifarResNet, 32, 8),
    ModelSpec("resnet20_1w32a", resnet20_1w32a, CifarResNet, 32, 8),
    ModelSpec("resnet18_cifar", resnet18_cifar, CifarResNet, 32, 8),
    ModelSpec("vgg_small", vgg_small, VGGSmall, 32, 32),
    ModelSpec("resnet18", resnet18, ImageNetResNet, 224, 32),
    ModelSpec("resnet34", resnet34, ImageNetResNet, 224, 32),
    ModelSpec("resnet18_1w32a", resnet18_1w32a, ImageNetResNet, 224, 32),
    ModelSpec("resnet34_1w32a", resnet34_1w32a, ImageNetResNet, 224, 32),
)
REGISTRY: dict[str, ModelSpec] = {s.name: s for s in _SPECS}
FAMILIES: tuple[type[nnx.Module], ...] = tuple(dict.fromkeys(s.family for s in _SPECS))


def spec(name: str) -> ModelSpec:
  """The registry entry of ``name``; a ValueError listing the names if unknown."""
  if name not in REGISTRY:
    near = difflib.get_close_matches(name, list(REGISTRY), n=1)
    raise ValueError(f"unknown model {name!r}" + (f"; did you mean {near[0]!r}?" if near
                                                   else "")
                     + f" The registry has {sorted(REGISTRY)}; a network of your own is "
                     "named \"package.module:factory\" (factory(rngs=..., num_classes=..., "
                     "**model.kwargs) returns an nnx.Module; docs/binarize.md).")
  return REGISTRY[name]


def is_factory(name: str) -> bool:
  """Whether ``name`` is a user's ``"package.module:factory"`` rather than a registry key."""
  return ":" in name


def factory(name: str) -> Callable[..., nnx.Module]:
  """The callable ``"package.module:factory"`` names (imported now); a ValueError that
  says what to fix if the module or the attribute is missing."""
  module_name, _, attr = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"model {name!r}: cannot import module {module_name!r} ({e}); make "
                     "it importable (pip install it, or add its directory to PYTHONPATH)"
                     ) from e
  fn = getattr(module, attr, None)
  if not callable(fn):
    raise ValueError(f"model {name!r}: module {module_name!r} has no callable {attr!r}; "
                     "name a function or class that takes rngs= and returns an nnx.Module")
  return fn


def create(name: str, *, rngs: nnx.Rngs | None = None, conv_impl: str = "auto",
           devices: Sequence[jax.Device] | None = None, **kw) -> nnx.Module:
  """Builds model ``name``; ``rngs`` defaults to ``nnx.Rngs(0)``.

  ``name`` is a registry key, or ``"package.module:factory"``: a user's callable, called
  as ``factory(rngs=rngs, **kw)`` (``conv_impl`` does not apply: binarize the result with
  :func:`irnet_jax.binarize.binarize_model`, which takes the resolved backend).
  ``conv_impl`` is resolved for ``devices`` (the devices the model will run on; None:
  JAX's default device), see :func:`irnet_jax.kernels.resolve`.
  """
  rngs = rngs if rngs is not None else nnx.Rngs(0)
  if is_factory(name):
    model = factory(name)(rngs=rngs, **kw)
    if not isinstance(model, nnx.Module):
      raise ValueError(f"model {name!r} returned {type(model).__name__}, not an nnx.Module")
    return model
  build = spec(name).build
  if kw.get("structure") is None:
    kw.pop("structure", None)
  return build(rngs=rngs, conv_impl=kernels.resolve(conv_impl, devices), **kw)


__all__ = ["create", "spec", "is_factory", "factory", "ModelSpec", "REGISTRY", "FAMILIES",
           "CifarResNet", "ImageNetResNet", "VGGSmall"]
