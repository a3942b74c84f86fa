"""Quickstart: a binary (1w1a) ResNet-20 on scikit-learn's handwritten digits.

Offline, no download: the 1,797 8x8 digits ship with scikit-learn (upsampled to
16x16 RGB; 1,437 train / 360 held-out test images). Binary weights (Libra-PB) and
activations (EDE) in every 3x3 conv; first conv and last linear full precision.
Finishes in about a minute or two on 2 CPU cores with >= 0.95 test accuracy.
"""
from irnet_jax import config as base


def get_config():
  c = base.base_config()
  c.dataset.name = "digits"
  c.dataset.augment = "shift"
  c.dataset.image_size = 16
  c.num_epochs = 30
  c.batch_size = 64
  c.eval_batch_size = 360
  c.log_every_steps = 20
  c.checkpoint_every_steps = 200
  c.analysis_every_steps = 44  # Information-retention diagnostics every 2 epochs.
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 1e-4
  c.ede.t_min = 0.1   # The paper's schedule.
  c.ede.t_max = 10.0
  return c
