"""ImageNet ResNet-18/34 of the official IR-Net code (ImageNet/ResNet18/1w1a/models).

Input ``(N, H, W, 3)`` NHWC (224x224 for ImageNet; any size >= 32 works);
output logits. FP 7x7 stem, BN, hardtanh, 3x3/2 max pool; Bi-Real basic blocks
with FP 1x1 conv + BN ``downsample``; global average pool, BatchNorm1d, FP ``fc``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from irnet_jax import layers, ops
from irnet_jax.models.blocks import make_stage

_WIDTHS = (64, 128, 256, 512)


class ImageNetResNet(nnx.Module):
  """Official ImageNet ResNet. Differences from the PyTorch module, both harmless:

  * the output is logits; upstream applies LogSoftmax, which cross-entropy re-applies
    idempotently, so losses and argmax are identical;
  * the 1w32a variants (``resnet18_1w32a``) follow ImageNet/ResNet18/1w32a: plain
    blocks and ReLU instead of hardtanh;
  * ``AvgPool2d(7)`` is a global average pool (identical at 224x224, and also valid
    for the small inputs used in tests).

  ``bn3`` (BatchNorm1d(num_classes)) exists upstream but is never called in forward;
  it is kept here, also unused, so that official checkpoints load key-for-key.
  ``conv_impl`` is the resolved convolution backend (:mod:`irnet_jax.kernels`).
  """

  def __init__(self, *, depths, num_classes: int = 1000, structure: str = "bireal",
               weight_bits: int = 1, act_bits: int = 1, estimator: str = "ede",
               weight_quantizer: str = "libra_pb", activation: str = "hardtanh", dtype=None,
               param_dtype=jnp.float32, conv_impl: str = "xla", rngs: nnx.Rngs):
    init = layers.he_normal("fan_out")  # normal_(0, sqrt(2 / (k*k*out))) upstream.
    self.conv_impl = conv_impl
    conv_kw = layers.conv_kwargs(weight_bits, act_bits, estimator, weight_quantizer,
                                 dtype, param_dtype, conv_impl)
    self.conv1 = layers.fp_conv(3, 64, 7, strides=2, padding=3, kernel_init=init,
                                dtype=dtype, param_dtype=param_dtype, conv_impl=conv_impl,
                                rngs=rngs)
    self.bn1 = layers.BatchNorm(64, param_dtype=param_dtype)
    in_planes = 64
    for i, (planes, n) in enumerate(zip(_WIDTHS, depths)):
      setattr(self, f"layer{i + 1}", make_stage(
          in_planes, planes, n, 1 if i == 0 else 2, structure=structure, option="B",
          shortcut_attr="downsample", conv_kw=conv_kw, kernel_init=init,
          activation=activation, rngs=rngs))
      in_planes = planes
    self.bn2 = layers.BatchNorm(512, param_dtype=param_dtype)
    self.fc = layers.dense(512, num_classes, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.bn3 = layers.BatchNorm(num_classes, param_dtype=param_dtype)
    self.act = ops.activation(activation)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.act(self.bn1(self.conv1(x)))
    x = layers.max_pool(x, 3, 2, padding=1)
    for i in range(len(_WIDTHS)):
      for block in getattr(self, f"layer{i + 1}"):
        x = block(x)
    return self.fc(self.bn2(layers.global_avg_pool(x)))


def resnet18(**kw) -> ImageNetResNet:
  return ImageNetResNet(depths=(2, 2, 2, 2), **kw)


def resnet34(**kw) -> ImageNetResNet:
  return ImageNetResNet(depths=(3, 4, 6, 3), **kw)


# The official ImageNet 1w32a networks use plain blocks and ReLU everywhere.
def resnet18_1w32a(*, act_bits: int = 32, structure: str = "plain", **kw) -> ImageNetResNet:
  return resnet18(act_bits=act_bits, structure=structure, activation="relu", **kw)


def resnet34_1w32a(*, act_bits: int = 32, structure: str = "plain", **kw) -> ImageNetResNet:
  return resnet34(act_bits=act_bits, structure=structure, activation="relu", **kw)
