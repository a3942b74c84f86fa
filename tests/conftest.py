"""Test setup and the helpers tests share (as fixtures; test files never import each other).

4 simulated CPU devices so sharding is exercised without accelerators: the XLA flag must
be set before JAX initializes its backends, hence at import time of this conftest (pytest
imports it before any test module).
"""
import json
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (exact comparisons), restoring the flag after."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


# Tests build the same few networks many times: a persistent compilation cache
# shared by the whole session makes every compile after the first a cache hit.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("IRNET_TEST_JAX_CACHE", "/tmp/irnet_jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


# ------------------------------------------------------------------ shared helpers


@pytest.fixture(scope="session")
def repo_root() -> str:
  """The checkout's root: the working directory of ``python -m irnet_jax.*`` subprocesses."""
  return REPO


def _make_npz(path, n_train=64, n_test=21, size=8, seed=0):
  """A learnable toy set: the class (4 of them) is the bright quadrant of a noisy image.
  Writes ``x_train, y_train, x_test, y_test`` to ``path``; returns it as a string."""
  rng = np.random.default_rng(seed)

  def split(n):
    y = rng.integers(0, 4, n)
    x = rng.integers(0, 60, (n, size, size, 3))
    h = size // 2
    for i, c in enumerate(y):
      x[i, (c // 2) * h:(c // 2 + 1) * h, (c % 2) * h:(c % 2 + 1) * h] += 180
    return x.astype(np.uint8), y.astype(np.int32)

  x_train, y_train = split(n_train)
  x_test, y_test = split(n_test)
  np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  return str(path)


@pytest.fixture(scope="session")
def make_npz():
  """``make_npz(path, n_train=64, n_test=21, size=8, seed=0)``: writes a toy set of
  ``size``-pixel images (see :func:`_make_npz`) and returns its path."""
  return _make_npz


@pytest.fixture(scope="session")
def toy_npz(tmp_path_factory) -> str:
  """The default toy set (64 train, 21 test 8x8 images, 4 classes), written once per
  session; tests only read it."""
  return _make_npz(tmp_path_factory.mktemp("data") / "toy.npz")


def _tiny_config(npz, **overrides):
  """base_config() on ``npz`` for a few seconds of training: batch 16, 6 steps,
  checkpoints every 2, a log record every step, evaluation at the end. ``overrides`` are
  dotted keys, e.g. ``**{"dataset.augment": "shift"}``."""
  from irnet_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.base_config()
  c.dataset.name, c.dataset.path = "npz", npz
  c.dataset.augment, c.dataset.image_size, c.dataset.num_threads = "none", 8, 0
  c.batch_size, c.eval_batch_size = 16, 8
  c.num_train_steps, c.checkpoint_every_steps, c.log_every_steps = 6, 2, 1
  c.eval_every_steps = 6
  c.progress_bar = False
  c.ede.schedule_by = "step"
  c.update_from_flattened_dict(overrides)
  return c


@pytest.fixture(scope="session")
def tiny_config():
  """``tiny_config(npz, **overrides)``: a small training config on an npz file (see
  :func:`_tiny_config`)."""
  return _tiny_config


def _read_metrics(workdir, split):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


@pytest.fixture(scope="session")
def read_metrics():
  """``read_metrics(workdir, split)``: the records of ``split`` in workdir/metrics.jsonl."""
  return _read_metrics
