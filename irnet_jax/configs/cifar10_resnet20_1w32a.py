"""CIFAR-10 ResNet-20 1w32a (binary weights, float activations): paper Table 3 (90.8%).

The official 1w32a network (CIFAR-10/ResNet20/1w32a) has plain blocks with ReLU, no
activation after the stem and a ReLU after the last BN: model "resnet20_1w32a".
"""
from irnet_jax import config as base


def get_config():
  c = base.base_config()
  c.model.name = "resnet20_1w32a"
  c.model.act_bits = 32
  return c
