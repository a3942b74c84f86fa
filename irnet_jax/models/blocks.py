"""The residual basic block shared by the CIFAR and ImageNet ResNets."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from irnet_jax import kernels, layers, ops

STRUCTURES = ("bireal", "plain")


def option_a_shortcut(x: jax.Array, planes: int) -> jax.Array:
  """CIFAR ResNet option A: ``x[:, ::2, ::2]`` zero-padded by planes//4 channels per side."""
  p = planes // 4
  return jnp.pad(x[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (p, p)))


class BasicBlock(nnx.Module):
  """Two binary 3x3 convs with BN and hardtanh; NHWC in, NHWC out.

  structure="bireal" (IR-Net's official ResNet-20/ImageNet code, a shortcut around
  *each* conv)::

      out = hardtanh(bn1(conv1(x)) + shortcut(x))
      out = hardtanh(bn2(conv2(out)) + out)

  structure="plain" (one shortcut per block, the official CIFAR ResNet-18)::

      out = hardtanh(bn1(conv1(x)))
      out = hardtanh(bn2(conv2(out)) + shortcut(x))

  The shortcut of a block that changes shape is option "A" (parameter-free
  subsample + channel zero-pad) or "B" (full-precision 1x1 conv + BN, stored under
  ``shortcut_attr`` -- "shortcut" in the CIFAR code, "downsample" in ImageNet's --
  so that state paths match the official state_dict keys).

  ``activation`` replaces hardtanh by ReLU for the official 1w32a networks. The
  residual stream ``out`` goes through the backend's ``residual`` (``conv_kw``'s
  ``conv_impl``), which may materialize it once for the blocks that read it.
  """

  def __init__(self, in_planes: int, planes: int, stride: int, *, structure: str,
               option: str, shortcut_attr: str, conv_kw: dict, kernel_init,
               activation: str = "hardtanh", rngs: nnx.Rngs):
    if structure not in STRUCTURES:
      raise ValueError(f"unknown structure {structure!r}; expected one of {STRUCTURES}")
    pd = conv_kw["param_dtype"]
    self.conv1 = layers.BinaryConv(in_planes, planes, 3, strides=stride, padding=1,
                                   kernel_init=kernel_init, rngs=rngs, **conv_kw)
    self.bn1 = layers.BatchNorm(planes, param_dtype=pd)
    self.conv2 = layers.BinaryConv(planes, planes, 3, strides=1, padding=1,
                                   kernel_init=kernel_init, rngs=rngs, **conv_kw)
    self.bn2 = layers.BatchNorm(planes, param_dtype=pd)
    self.structure, self.planes, self.shortcut_attr = structure, planes, shortcut_attr
    self.conv_impl = conv_kw["conv_impl"]
    self.act = ops.activation(activation)
    self.option = None
    if stride != 1 or in_planes != planes:
      self.option = option
      if option == "B":
        setattr(self, shortcut_attr, nnx.List([
            layers.fp_conv(in_planes, planes, 1, strides=stride, kernel_init=kernel_init,
                           dtype=conv_kw["dtype"], param_dtype=pd,
                           conv_impl=self.conv_impl, rngs=rngs),
            layers.BatchNorm(planes, param_dtype=pd)]))
      elif option != "A":
        raise ValueError(f"unknown shortcut option {option!r}; expected 'A' or 'B'")

  def residual(self, x: jax.Array) -> jax.Array:
    if self.option is None:
      return x
    if self.option == "A":
      return option_a_shortcut(x, self.planes)
    conv, bn = getattr(self, self.shortcut_attr)
    return bn(conv(x))

  def __call__(self, x: jax.Array) -> jax.Array:
    act = self.act
    if self.structure == "bireal":
      stream = kernels.get(self.conv_impl).residual
      out = stream(act(self.bn1(self.conv1(x)) + self.residual(x)))
      return stream(act(self.bn2(self.conv2(out)) + out))
    out = act(self.bn1(self.conv1(x)))
    return act(self.bn2(self.conv2(out)) + self.residual(x))


def make_stage(in_planes: int, planes: int, num_blocks: int, stride: int,
               **block_kw) -> nnx.List:
  """``num_blocks`` blocks, the first with ``stride``; an ``nnx.List`` (paths ``layerN.i``)."""
  blocks = []
  for s in [stride] + [1] * (num_blocks - 1):
    blocks.append(BasicBlock(in_planes, planes, s, **block_kw))
    in_planes = planes
  return nnx.List(blocks)
