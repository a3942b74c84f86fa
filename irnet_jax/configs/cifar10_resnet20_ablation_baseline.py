"""Ablation (paper Table 1, ResNet-20 on CIFAR-10): the baseline -- plain sign of the
weights (no standardization, no scale) and the clipped straight-through estimator for
both weights and activations. Same network and recipe as cifar10_resnet20.py."""
from irnet_jax import config as base


def get_config():
  c = base.base_config()
  c.model.weight_quantizer = "sign"
  c.model.estimator = "ste"
  return c
