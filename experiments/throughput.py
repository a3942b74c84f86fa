"""Train/eval throughput of a config's real jitted steps on synthetic data.

  python experiments/throughput.py --config=cifar10_resnet20 --steps=20 \
      [--steps_per_call=K] [--resident]

Builds exactly what ``python -m irnet_jax.main`` builds (``irnet_jax.train.build``) and
times its train call: K optimizer steps per device call (``config.steps_per_call``, a
``lax.scan``), over K random uint8 batches of the config's shape (batch_size x
image_size^2 x 3) or, with ``--resident``, over a random uint8 training set held on the
device (``dataset.cache_on_device``: gather, crop and flip inside the call). ``--steps``
timed steps (rounded up to whole calls) after ``--warmup`` untimed calls (compile
included there), then the eval step. The last stdout line is a JSON object with
``train_images_per_sec`` and
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

from irnet_jax import configs, train

FLAGS = flags.FLAGS
configs.define_flag("config")
flags.DEFINE_integer("steps", 20, "Timed train steps.")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (compilation).")
flags.DEFINE_integer("num_classes", 10, "Classes of the synthetic labels.")
flags.DEFINE_integer("steps_per_call", None, "K steps per device call (default: config's).")
flags.DEFINE_bool("resident", False, "Training data held on the device (synthetic).")
flags.mark_flags_as_required(["config"])


def _batch(c, setup, rng, with_mask=False):
  n, s = c.batch_size, c.dataset.image_size
  batch = {"image": rng.normal(size=(n, s, s, 3)).astype(np.float32),
           "label": rng.integers(0, c.model.num_classes, n).astype(np.int32)}
  if with_mask:
    batch["mask"] = np.ones(n, bool)
  return {k: jax.device_put(v, setup.batch_sharding) for k, v in batch.items()}


def _call_inputs(c, setup, rng):
  """Arguments of ``setup.train_call`` after the state: K stacked uint8 batches, or the
  resident set and K index rows."""
  k, n, s = c.steps_per_call, c.batch_size, c.dataset.image_size
  if setup.resident is not None:
    indices = rng.integers(0, setup.resident.num_train, (k, n)).astype(np.int32)
    return setup.resident.train, jax.device_put(indices, setup.stacked_sharding)
  batches = {"image": rng.integers(0, 256, (k, n, s, s, 3)).astype(np.uint8),
             "label": rng.integers(0, c.model.num_classes, (k, n)).astype(np.int32)}
  return (jax.device_put(batches, setup.stacked_sharding),)


def _synthetic_npz(c, rng):
  """A random uint8 data set of the config's image size for ``--resident`` (50,000
  training images, as CIFAR-10), written once to a temporary file."""
  import tempfile
  s = c.dataset.image_size
  path = os.path.join(tempfile.gettempdir(), f"irnet_throughput_{s}.npz")
  if not os.path.exists(path):
    np.savez(path, x_train=rng.integers(0, 256, (50000, s, s, 3), dtype=np.uint8),
             y_train=rng.integers(0, c.model.num_classes, 50000).astype(np.int32),
             x_test=rng.integers(0, 256, (500, s, s, 3), dtype=np.uint8),
             y_test=rng.integers(0, c.model.num_classes, 500).astype(np.int32))
  return path


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
    if FLAGS.steps_per_call:
      c.steps_per_call = FLAGS.steps_per_call
    if FLAGS.resident:
      c.dataset.name, c.dataset.path = "npz", _synthetic_npz(c, np.random.default_rng(1))
      c.dataset.augment = "cifar" if c.dataset.augment == "cifar" else "none"
      c.dataset.cache_on_device = True
  steps_per_epoch, total = 1000, 1000 * max(1, int(c.num_epochs))
  setup = train.build(c, jax.devices(), steps_per_epoch, total)
  rng = np.random.default_rng(0)
  inputs = _call_inputs(c, setup, rng)
  state = setup.state
  calls = -(-FLAGS.steps // c.steps_per_call)

  def train_once():
    nonlocal state
    state, metrics = setup.train_call(state, *inputs)
    return metrics

  _time(train_once, FLAGS.warmup)
  train_s = _time(train_once, calls)
  timed_steps = calls * c.steps_per_call
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
                steps_per_call=c.steps_per_call, resident=setup.resident is not None,
                steps=timed_steps, train_ms_per_step=1000 * train_s / timed_steps,
                train_images_per_sec=c.batch_size * timed_steps / train_s,
                eval_images_per_sec=c.batch_size * FLAGS.steps / eval_s)
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
