"""Model registry: ``models.create(name, **kw)``.

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
"""
from __future__ import annotations

from typing import Callable, Sequence

import jax
from flax import nnx

from irnet_jax import kernels

from irnet_jax.models.resnet_cifar import (CifarResNet, resnet18_cifar, resnet20,
                                           resnet20_1w32a)
from irnet_jax.models.resnet_imagenet import (ImageNetResNet, resnet18, resnet18_1w32a,
                                              resnet34, resnet34_1w32a)
from irnet_jax.models.vgg_small import VGGSmall, vgg_small

REGISTRY: dict[str, Callable[..., nnx.Module]] = {
    "resnet20": resnet20,
    "resnet20_1w32a": resnet20_1w32a,
    "resnet18_cifar": resnet18_cifar,
    "vgg_small": vgg_small,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet18_1w32a": resnet18_1w32a,
    "resnet34_1w32a": resnet34_1w32a,
}

# Input resolution each network is designed for (height = width).
INPUT_SIZE = {"resnet20": 32, "resnet20_1w32a": 32, "resnet18_cifar": 32, "vgg_small": 32,
              "resnet18": 224, "resnet34": 224, "resnet18_1w32a": 224, "resnet34_1w32a": 224}


def create(name: str, *, rngs: nnx.Rngs | None = None, conv_impl: str = "auto",
           devices: Sequence[jax.Device] | None = None, **kw) -> nnx.Module:
  """Builds model ``name``; ``rngs`` defaults to ``nnx.Rngs(0)``.

  ``conv_impl`` is resolved for ``devices`` (the devices the model will run on; None:
  JAX's default device), see :func:`irnet_jax.kernels.resolve`.
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown model {name!r}; choose one of {sorted(REGISTRY)}")
  if kw.get("structure") is None:
    kw.pop("structure", None)
  return REGISTRY[name](rngs=rngs if rngs is not None else nnx.Rngs(0),
                        conv_impl=kernels.resolve(conv_impl, devices), **kw)


__all__ = ["create", "REGISTRY", "INPUT_SIZE", "CifarResNet", "ImageNetResNet",
           "VGGSmall"]
