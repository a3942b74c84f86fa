"""ImageNet ResNet-18 1w1a (Bi-Real blocks): paper Table 4 (58.1% top-1, 80.0% top-5).

Official recipe (ImageNet/ResNet18/1w1a/config.yaml): batch 2048 (64 x 32 GPUs), SGD
Nesterov, warm-up 0.2 -> 0.8 over 2,500 iterations then x0.1 at 30/60/90% of 62,500
iterations, weight decay 1e-5 for this row.
"""
from irnet_jax import config as base


def get_config():
  c = base.imagenet_config("resnet18")
  c.optimizer.weight_decay = 1e-5
  return c
