"""Full-precision twin of cifar10_resnet18.py (weight_bits = act_bits = 32, same structure
and recipe, hardtanh kept): the FP row of the paper's Table 3 (93.0%)."""
from irnet_jax.configs import cifar10_resnet18


def get_config():
  c = cifar10_resnet18.get_config()
  c.model.weight_bits = 32
  c.model.act_bits = 32
  return c
