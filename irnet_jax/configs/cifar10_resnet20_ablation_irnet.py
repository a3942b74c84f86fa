"""Ablation (paper Table 1): IR-Net = Libra-PB + EDE (identical to cifar10_resnet20.py,
named here so that the four ablation configs sit together)."""
from irnet_jax import config as base


def get_config():
  c = base.base_config()
  c.model.weight_quantizer = "libra_pb"
  c.model.estimator = "ede"
  return c
