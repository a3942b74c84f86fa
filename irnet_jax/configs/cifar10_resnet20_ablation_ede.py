"""Ablation (paper Table 1): plain-sign weights with the EDE backward (no Libra-PB)."""
from irnet_jax import config as base


def get_config():
  c = base.base_config()
  c.model.weight_quantizer = "sign"
  c.model.estimator = "ede"
  return c
