"""Train/eval throughput of a config's real jitted steps on synthetic data.

  python experiments/throughput.py --config=configs/cifar10_resnet20.py --steps=20

Builds exactly what ``python -m irnet_jax.main`` builds (``irnet_jax.train.build``),
feeds random batches of the config's shape (batch_size x image_size^2 x 3), times
``--steps`` train steps after ``--warmup`` untimed ones (compile included there), then
the eval step. The last stdout line is a JSON object with ``train_images_per_sec`` and
``eval_images_per_sec`` (and the ``GLIBC_TUNABLES`` and ``conv_impl`` it ran with).
"""
from __future__ import annotations

import json
import os
import platform
import time

if __name__ == "__main__":
  # Measure what the launcher runs: it re-executes with huge pages where they help
  # (irnet_jax/hugepages.py); IRNET_JAX_HUGEPAGES=0 measures without.
  from irnet_jax import hugepages
  hugepages.reexec(__name__)

import jax  # pylint: disable=wrong-import-position
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from irnet_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
flags.DEFINE_integer("steps", 20, "Timed train steps.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).")
flags.DEFINE_integer("num_classes", 10, "Classes of the synthetic labels.")
flags.mark_flags_as_required(["config"])


def _batch(c, setup, rng, with_mask=False):
  n, s = c.batch_size, c.dataset.image_size
  batch = {"image": rng.normal(size=(n, s, s, 3)).astype(np.float32),
           "label": rng.integers(0, c.model.num_classes, n).astype(np.int32)}
  if with_mask:
    batch["mask"] = np.ones(n, bool)
  return {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}


def _time(fn, n):
  start = time.perf_counter()
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return time.perf_counter() - start


def main(argv) -> None:
  del argv
  c = FLAGS.config.copy_and_resolve_references()
  with c.unlocked():
    if c.model.num_classes <= 0:
      c.model.num_classes = FLAGS.num_classes
  steps_per_epoch, total = 1000, 1000 * max(1, int(c.num_epochs))
  setup = train.build(c, jax.devices(), steps_per_epoch, total)
  rng = np.random.default_rng(0)
  batch = _batch(c, setup, rng)
  state = setup.state

  def train_once():
    nonlocal state
    state, metrics = setup.train_step(state, batch)
    return metrics

  _time(train_once, FLAGS.warmup)
  train_s = _time(train_once, FLAGS.steps)
  eval_batch = _batch(c, setup, rng, with_mask=True)
  eval_once = lambda: setup.eval_step(state[0], eval_batch)
  _time(eval_once, FLAGS.warmup)
  eval_s = _time(eval_once, FLAGS.steps)
  result = dict(config=c.model.name, bits=f"{c.model.weight_bits}w{c.model.act_bits}a",
                compute_dtype=c.compute_dtype, batch=c.batch_size,
                image_size=c.dataset.image_size,
                devices=jax.device_count(), backend=jax.default_backend(),
                conv_impl=setup.conv_impl,
                jax_version=jax.__version__, cpu=platform.processor() or platform.machine(),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                steps=FLAGS.steps, train_ms_per_step=1000 * train_s / FLAGS.steps,
                train_images_per_sec=c.batch_size * FLAGS.steps / train_s,
                eval_images_per_sec=c.batch_size * FLAGS.steps / eval_s)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
