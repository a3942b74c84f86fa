"""CIFAR ResNets of the official IR-Net code: ResNet-20 and ResNet-18.

Input ``(N, 32, 32, 3)`` NHWC, normalized floats; output logits ``(N, classes)``.
State paths mirror the official ``state_dict`` keys (``conv1``, ``bn1``,
``layer1.0.conv1``, ``bn2``, ``linear``); see :mod:`irnet_jax.convert`.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from irnet_jax import layers, ops
from irnet_jax.models.blocks import make_stage


class CifarResNet(nnx.Module):
  """``conv1(FP) -> bn1 [-> hardtanh] -> layer1..N -> avg pool -> bn2 (1d) -> linear(FP)``.

  Args:
    widths, depths: channels and number of blocks of each stage; strides 1, 2, 2, ...
    structure: "bireal" or "plain" (see :class:`~irnet_jax.models.blocks.BasicBlock`).
    shortcut: "A" (parameter-free, ResNet-20) or "B" (FP 1x1 conv + BN, ResNet-18).
    stem_act: activation after the stem (ResNet-20 1w1a has it; ResNet-18 not).
    head_act: activation after bn2, before the FC (the official ResNet-20 1w32a).
    activation: "hardtanh" (1w1a) or "relu" (official 1w32a).
    weight_bits, act_bits, estimator, weight_quantizer: of every binary 3x3 conv.
    dtype: compute dtype (None: promoted from inputs/params); param_dtype: params.
    conv_impl: the resolved convolution backend of every conv (:mod:`irnet_jax.kernels`;
      ``models.create`` resolves "auto"); kept as ``self.conv_impl``.
  """

  def __init__(self, *, widths: Sequence[int], depths: Sequence[int], num_classes: int = 10,
               structure: str = "bireal", shortcut: str = "A", stem_act: bool = True,
               head_act: bool = False, activation: str = "hardtanh",
               weight_bits: int = 1, act_bits: int = 1, estimator: str = "ede",
               weight_quantizer: str = "libra_pb", kernel_init=None, dtype=None,
               param_dtype=jnp.float32, conv_impl: str = "xla", rngs: nnx.Rngs):
    self.conv_impl = conv_impl
    conv_kw = layers.conv_kwargs(weight_bits, act_bits, estimator, weight_quantizer,
                                 dtype, param_dtype, conv_impl)
    self.conv1 = layers.fp_conv(3, widths[0], 3, padding=1, kernel_init=kernel_init,
                                dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl,
                                rngs=rngs)
    self.bn1 = layers.BatchNorm(widths[0], param_dtype=param_dtype)
    in_planes = widths[0]
    for i, (planes, n) in enumerate(zip(widths, depths)):
      stage = make_stage(in_planes, planes, n, 1 if i == 0 else 2, structure=structure,
                         option=shortcut, shortcut_attr="shortcut", conv_kw=conv_kw,
                         kernel_init=kernel_init, activation=activation, rngs=rngs)
      setattr(self, f"layer{i + 1}", stage)
      in_planes = planes
    self.num_stages = len(widths)
    self.bn2 = layers.BatchNorm(in_planes, param_dtype=param_dtype)
    self.linear = layers.dense(in_planes, num_classes, kernel_init=kernel_init,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem_act, self.head_act = stem_act, head_act
    self.act = ops.activation(activation)

  def __call__(self, x: jax.Array) -> jax.Array:
    out = self.bn1(self.conv1(x))
    if self.stem_act:
      out = self.act(out)
    for i in range(self.num_stages):
      for block in getattr(self, f"layer{i + 1}"):
        out = block(out)
    out = self.bn2(layers.global_avg_pool(out))
    if self.head_act:
      out = self.act(out)
    return self.linear(out)


def resnet20(*, structure: str = "bireal", **kw) -> CifarResNet:
  """ResNet-20 (0.27M params): 3 stages of 3 blocks, 16/32/64 channels, option-A shortcuts.

  Official: CIFAR-10/ResNet20/1w1a (Bi-Real structure), kaiming-normal init.
  """
  kw.setdefault("kernel_init", layers.he_normal("fan_in"))
  kw.setdefault("stem_act", True)
  return CifarResNet(widths=(16, 32, 64), depths=(3, 3, 3), structure=structure,
                     shortcut="A", **kw)


def resnet20_1w32a(*, act_bits: int = 32, **kw) -> CifarResNet:
  """The official ResNet-20 1w32a (CIFAR-10/ResNet20/1w32a): a *different* network from
  1w1a -- plain blocks with ReLU, no activation after the stem, ReLU after bn2."""
  kw.setdefault("structure", "plain")
  return resnet20(act_bits=act_bits, activation="relu", stem_act=False, head_act=True, **kw)


def resnet18_cifar(*, structure: str = "plain", **kw) -> CifarResNet:
  """CIFAR ResNet-18: 4 stages of 2 blocks, 64..512 channels, FP 1x1 conv+BN shortcuts.

  Official: CIFAR-10/ResNet18/resnet.py (plain blocks, no activation after the stem,
  PyTorch default init). Its LogSoftmax output is omitted: the loss applies it.
  """
  kw.setdefault("kernel_init", nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform"))
  return CifarResNet(widths=(64, 128, 256, 512), depths=(2, 2, 2, 2), structure=structure,
                     shortcut="B", stem_act=False, **kw)
