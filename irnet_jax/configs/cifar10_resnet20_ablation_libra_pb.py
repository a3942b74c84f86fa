"""Ablation (paper Table 1): Libra-PB weights, clipped STE backward (no EDE)."""
from irnet_jax import config as base


def get_config():
  c = base.base_config()
  c.model.weight_quantizer = "libra_pb"
  c.model.estimator = "ste"
  return c
