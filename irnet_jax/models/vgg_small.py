"""VGG-Small of the official IR-Net code (CIFAR-10/VGG-Small/vgg.py, VGG_SMALL_1W1A).

Input ``(N, 32, 32, 3)`` NHWC; output logits. ``conv0`` (3->128) is full precision,
``conv1..conv5`` are binary; blocks are ``conv -> [maxpool] -> BN -> hardtanh``;
``fc`` (8192 -> classes) is full precision.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from irnet_jax import layers, ops

_CHANNELS = (128, 128, 256, 256, 512, 512)
POOL_AFTER = (1, 3, 5)


class VGGSmall(nnx.Module):
  def __init__(self, *, num_classes: int = 10, weight_bits: int = 1, act_bits: int = 1,
               estimator: str = "ede", weight_quantizer: str = "libra_pb", dtype=None,
               param_dtype=jnp.float32, conv_impl: str = "xla", rngs: nnx.Rngs,
               structure: str | None = None):
    del structure  # VGG has no residual structure; accepted for a uniform create().
    init = layers.he_normal("fan_out")  # normal_(0, sqrt(2 / (k*k*out))) upstream.
    self.conv_impl = conv_impl  # the resolved backend (irnet_jax.kernels)
    conv_kw = layers.conv_kwargs(weight_bits, act_bits, estimator, weight_quantizer,
                                 dtype, param_dtype, conv_impl)
    self.conv0 = layers.fp_conv(3, 128, 3, padding=1, kernel_init=init, dtype=dtype,
                                param_dtype=param_dtype, conv_impl=conv_impl, rngs=rngs)
    self.bn0 = layers.BatchNorm(128, param_dtype=param_dtype)
    for i in range(1, 6):
      setattr(self, f"conv{i}", layers.BinaryConv(
          _CHANNELS[i - 1], _CHANNELS[i], 3, padding=1, kernel_init=init, rngs=rngs,
          **conv_kw))
      setattr(self, f"bn{i}", layers.BatchNorm(_CHANNELS[i], param_dtype=param_dtype))
    self.fc = layers.dense(512 * 4 * 4, num_classes,
                           kernel_init=nnx.initializers.normal(0.01), dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = ops.hardtanh(self.bn0(self.conv0(x)))
    for i in range(1, 6):
      x = getattr(self, f"conv{i}")(x)
      if i in POOL_AFTER:
        x = layers.max_pool(x, 2, 2)
      x = ops.hardtanh(getattr(self, f"bn{i}")(x))
    # Flatten in torch's (C, H, W) order so that fc.weight loads without permutation.
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
    return self.fc(x)


def vgg_small(**kw) -> VGGSmall:
  """VGG-Small 1w1a (or any bit width), 32x32 inputs."""
  return VGGSmall(**kw)
