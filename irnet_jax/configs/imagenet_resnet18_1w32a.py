"""ImageNet ResNet-18 1w32a (official: plain blocks, ReLU): paper Table 4 (66.5% top-1)."""
from irnet_jax import config as base


def get_config():
  return base.imagenet_config("resnet18_1w32a", act_bits=32)
