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
# One persistent compilation cache for every program the tests compile, in this process
# and in the launcher subprocesses they start (which inherit these variables; JAX reads
# them when it is imported). For the subprocesses a threshold of 0 also caches the
# small per-shape programs of eager model initialization: a second tiny quickstart
# launch takes 8 s instead of 15 s (10 s with a 0.5 s threshold). This process keeps 0.5 s
# (below): its eager programs stay in memory, and writing each of them made the suite
# slower.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ.get(
    "IRNET_TEST_JAX_CACHE", "/tmp/irnet_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (exact comparisons), restoring the flag after."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


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


def _read_tensorboard(workdir) -> dict:
  """{(split, tag): [(step, value), ...]} as TensorBoard's backend reads the event files
  of ``workdir/tensorboard`` (purges included)."""
  # pylint: disable=import-outside-toplevel
  from tensorboard.backend.event_processing import plugin_event_multiplexer as event_multiplexer
  from tensorboard.util import tensor_util
  mux = event_multiplexer.EventMultiplexer()
  mux.AddRunsFromDirectory(os.path.join(workdir, "tensorboard"))
  mux.Reload()
  out = {}
  for run, content in mux.Runs().items():
    for tag in content["tensors"]:
      points = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
                for e in mux.Tensors(run, tag)]
      if points:  # A purge empties a tag's series but keeps its name.
        out[run, tag] = points
  return out


@pytest.fixture(scope="session")
def read_tensorboard():
  """``read_tensorboard(workdir)``: see :func:`_read_tensorboard`."""
  return _read_tensorboard


# ------------------------------------------------------------------ data sets made here


def _write_indexed_npz(path, n_train=40, n_test=13, side=8, grey=None, num_classes=5,
                       **overrides):
  """Image ``i`` of each split is filled with the value ``i`` (channel c with ``i + c``)
  so an example can be identified from its pixels; labels i % C. ``grey``: "2d" (N, H,
  W) or "1ch" (N, H, W, 1) images; ``overrides`` replace arrays (None: left out)."""
  def make(n):
    x = np.arange(n, dtype=np.uint8)[:, None, None, None] + np.zeros(
        (1, side, side, 3), np.uint8)
    x = x + np.arange(3, dtype=np.uint8)
    if grey == "2d":
      x = x[..., 0]
    elif grey == "1ch":
      x = x[..., :1]
    return x, (np.arange(n) % num_classes).astype(np.int64)
  x_train, y_train = make(n_train)
  x_test, y_test = make(n_test)
  arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
  arrays.update(overrides)
  arrays = {k: v for k, v in arrays.items() if v is not None}
  np.savez(path, **arrays)
  return str(path)


@pytest.fixture(scope="session")
def write_indexed_npz():
  """``write_indexed_npz(path, n_train=40, n_test=13, side=8, grey=None, num_classes=5,
  **overrides)``: an npz whose image ``i`` holds the value ``i`` (see
  :func:`_write_indexed_npz`); returns its path."""
  return _write_indexed_npz


def _write_image(path, h=20, w=28, seed=0, mode="RGB"):
  """A random ``h`` x ``w`` image in PIL ``mode`` at ``path`` (PNG if it ends in .png,
  JPEG otherwise), parent folders made; returns ``path``."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  img = Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).convert(mode)
  path.parent.mkdir(parents=True, exist_ok=True)
  img.save(path, "PNG" if path.suffix.lower() == ".png" else "JPEG")
  return path


@pytest.fixture(scope="session")
def write_image():
  """``write_image(path, h=20, w=28, seed=0, mode="RGB")``: see :func:`_write_image`."""
  return _write_image


def _age_files(root, seconds=100):
  """Backdates every file and folder under ``root``: the index cache skips trees
  modified in the last seconds (mtime races)."""
  import time  # pylint: disable=import-outside-toplevel
  when = time.time() - seconds
  for folder, dirs, files in os.walk(root):
    for name in dirs + files:
      os.utime(os.path.join(folder, name), (when, when))
  os.utime(root, (when, when))


@pytest.fixture(scope="session")
def age_files():
  """``age_files(root, seconds=100)``: see :func:`_age_files`."""
  return _age_files


def _image_tree(root, split="train"):
  """An ImageFolder split ``root/split``: class names whose sorted order differs from
  creation order and from a case-insensitive or natural sort; mixed-case extensions; a
  nested folder; two files that are not images. Aged (:func:`_age_files`); returns the
  split folder."""
  files = ["b/1.JPEG", "a/y.jpg", "a/x.jpeg", "a/sub/w.PNG", "a/z.txt",
           "a10/k.Jpg", "a2/q.png", "B/m.JPEG", "B/notes"]
  for i, f in enumerate(files):
    path = root / split / f
    if f.endswith((".txt", "notes")):
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text("not an image")
    else:
      _write_image(path, seed=i)
  _age_files(root)
  return root / split


@pytest.fixture(scope="session")
def image_tree():
  """``image_tree(root, split="train")``: see :func:`_image_tree`."""
  return _image_tree


def _dataset_cfg(name, augment, **fields):
  """A ``dataset`` config of ``name`` with the ``augment`` recipe, read in the test's
  process (no threads, no workers): 16-pixel images, train split "train", the source's
  default test split; ``fields`` add or replace entries."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  cfg = dict(name=name, data_dir="", path="", augment=augment, image_size=16,
             mean=(0.5,) * 3, std=(0.25,) * 3, num_threads=0, num_workers=0,
             train_split="train", test_split="")
  cfg.update(fields)
  return ml_collections.ConfigDict(cfg)


@pytest.fixture(scope="session")
def dataset_cfg():
  """``dataset_cfg(name, augment, **fields)``: see :func:`_dataset_cfg`."""
  return _dataset_cfg
