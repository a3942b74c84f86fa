"""ImageNet ResNet-34 1w1a (Bi-Real blocks): paper Table 4 (62.9% top-1, 84.1% top-5)."""
from irnet_jax import config as base


def get_config():
  return base.imagenet_config("resnet34")
