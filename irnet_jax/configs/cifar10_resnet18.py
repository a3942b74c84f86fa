"""CIFAR-10 ResNet-18 1w1a (official CIFAR-10/ResNet18): paper Table 3 (91.5%).

Plain blocks with FP 1x1 conv + BN shortcuts; the ResNet-20 recipe (SGD 0.1 cosine per
epoch, 400 epochs, batch 128, weight decay 1e-4, EDE 1e-3 -> 10 per epoch).
"""
from irnet_jax import config as base


def get_config():
  c = base.base_config()
  c.model.name = "resnet18_cifar"
  return c
