"""CIFAR-10 ResNet-20 1w1a, normal (one shortcut per block) structure: paper Table 3
IR-Net ResNet-20 (85.4%). Same recipe as cifar10_resnet20.py."""
from irnet_jax import config as base


def get_config():
  c = base.base_config()
  c.model.structure = "plain"
  return c
