"""CIFAR-10 ResNet-20 1w1a, Bi-Real structure: IR-Net* in the paper's Table 3 (86.5%).

The official recipe (CIFAR-10/ResNet20/1w1a/trainer.py): SGD momentum 0.9, lr 0.1
with cosine annealing stepped per epoch, 400 epochs, batch 128, L2 weight decay 1e-4
on all parameters, EDE t from 1e-3 to 10 updated per epoch, pad-4 random crop +
horizontal flip, ImageNet mean/std normalization. These are base_config() defaults.
"""
from irnet_jax import config as base


def get_config():
  c = base.base_config()
  c.model.name = "resnet20"
  c.model.structure = "bireal"
  return c
