"""Full-precision twin of imagenet_resnet18.py (same structure and recipe, 32-bit weights
and activations; the paper's FP ResNet-18 reference is 69.6% top-1)."""
from irnet_jax import config as base


def get_config():
  c = base.imagenet_config("resnet18")
  c.model.weight_bits = 32
  c.model.act_bits = 32
  return c
