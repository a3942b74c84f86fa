"""CIFAR-10 VGG-Small 1w1a (official CIFAR-10/VGG-Small): paper Table 3 (90.4%).

SGD momentum 0.9, lr 0.007 cosine per epoch, 300 epochs, batch 128, weight decay 1e-4.
"""
from irnet_jax import config as base


def get_config():
  c = base.base_config()
  c.model.name = "vgg_small"
  c.num_epochs = 300
  c.optimizer.learning_rate = 0.007
  return c
