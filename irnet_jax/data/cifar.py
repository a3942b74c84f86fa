"""CIFAR-10 / CIFAR-100 from the official python-version archives (no TensorFlow).

The archives (``cifar-10-python.tar.gz``, ``cifar-100-python.tar.gz`` from
https://www.cs.toronto.edu/~kriz/cifar.html) hold pickled dicts with
``b"data"``: uint8 ``(N, 3072)``, each row a 32x32 image as 1024 R, then G,
then B values (CHW, row-major), and ``b"labels"`` (CIFAR-10) or
``b"fine_labels"`` (CIFAR-100, the 100-class labels). They are read straight
from the ``.tar.gz`` with an unpickler that can only build numpy arrays,
lists, dicts, bytes and numbers, so a tampered archive cannot run code.

A missing archive is downloaded once into the data dir (md5-checked, written
to a temporary file then renamed), as torchvision does; without network the
error names the URL and the folder to put the file in.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request

import numpy as np

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Archive:
  """Where a CIFAR archive comes from and what it holds."""
  url: str
  md5: str
  train_members: tuple[str, ...]
  test_members: tuple[str, ...]
  label_key: bytes
  num_classes: int

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]


ARCHIVES = {
    "cifar10": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a",
        tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
        ("cifar-10-batches-py/test_batch",), b"labels", 10),
    "cifar100": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85",
        ("cifar-100-python/train",), ("cifar-100-python/test",),
        b"fine_labels", 100),
}


def default_data_dir() -> str:
  """``$IRNET_JAX_DATA_DIR``, else ``~/.cache/irnet_jax/data``."""
  return os.environ.get("IRNET_JAX_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "irnet_jax", "data")


def md5sum(path: str, chunk: int = 1 << 20) -> str:
  digest = hashlib.md5()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      digest.update(block)
  return digest.hexdigest()


def _fetch(url: str, folder: str, filename: str, md5: str) -> str:
  """Downloads ``url`` to ``folder/filename`` via a temporary file; md5-checked."""
  os.makedirs(folder, exist_ok=True)
  target = os.path.join(folder, filename)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=filename + ".", suffix=".part")
  try:
    digest = hashlib.md5()
    log.info("downloading %s to %s", url, target)
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as r:
      for block in iter(lambda: r.read(1 << 20), b""):
        digest.update(block)
        out.write(block)
    if digest.hexdigest() != md5:
      raise ValueError(f"The download of {url} has md5 {digest.hexdigest()}, "
                       f"expected {md5}: it is corrupt or incomplete. Try "
                       f"again, or download it by hand into {folder}/.")
    os.replace(tmp, target)
  finally:
    if os.path.exists(tmp):
      os.unlink(tmp)
  return target


def archive_path(name: str, data_dir: str | None = None,
                 download: bool = True) -> str:
  """The checked archive of ``name`` in ``data_dir``, downloaded if missing.

  Raises:
    ValueError: no archive and the download failed (names the URL and the
      folder), or a download / existing file with the wrong md5.
  """
  archive = ARCHIVES[name]
  folder = os.path.expanduser(data_dir or default_data_dir())
  path = os.path.join(folder, archive.filename)
  if os.path.isfile(path):
    return path
  how = (f"Download {archive.url} (md5 {archive.md5}) on a machine with "
         f"internet access and put it in {folder}/ (or set "
         f"--config.dataset.data_dir to the folder that holds it).")
  if not download:
    raise ValueError(f"{archive.filename} is not in {folder}. " + how)
  try:
    return _fetch(archive.url, folder, archive.filename, archive.md5)
  except (urllib.error.URLError, OSError) as e:
    raise ValueError(f"{archive.filename} is not in {folder} and downloading "
                     f"it failed ({type(e).__name__}: {e}). " + how) from e


class _ArraysOnlyUnpickler(pickle.Unpickler):
  """Resolves only what numpy arrays need; any other global is refused."""

  _ALLOWED = {
      ("_codecs", "encode"),  # How protocol-2 pickles made by Python 3 hold bytes.
      ("numpy.core.multiarray", "_reconstruct"),
      ("numpy._core.multiarray", "_reconstruct"),
      ("numpy.core.numeric", "_frombuffer"),
      ("numpy._core.numeric", "_frombuffer"),
      ("numpy", "ndarray"),
      ("numpy", "dtype"),
  }

  def find_class(self, module: str, name: str):
    if (module, name) not in self._ALLOWED:
      raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in "
                                   f"a CIFAR archive")
    if module.startswith("numpy.core.") and hasattr(np, "_core"):
      module = "numpy._core." + module[len("numpy.core."):]  # Numpy >= 2 name.
    return super().find_class(module, name)


def _read_batch(tar: tarfile.TarFile, member: str, label_key: bytes
                ) -> tuple[np.ndarray, np.ndarray]:
  """One pickled batch -> (uint8 (N, 32, 32, 3) NHWC, int32 (N,))."""
  f = tar.extractfile(member)
  if f is None:
    raise KeyError(member)
  batch = _ArraysOnlyUnpickler(f, encoding="bytes").load()
  data = np.asarray(batch[b"data"])
  labels = np.asarray(batch[label_key], np.int32)
  if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
    raise ValueError(f"{member}: data is {data.dtype} {data.shape}, expected "
                     f"uint8 (N, 3072)")
  if labels.shape != (len(data),):
    raise ValueError(f"{member}: {labels.shape} labels for {len(data)} images")
  # Rows are CHW planes; NHWC is what the pipeline and the models use.
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels


@functools.lru_cache(maxsize=2)
def _load(path: str, name: str, size: int, mtime_ns: int
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  del size, mtime_ns  # Part of the cache key only: a replaced file is re-read.
  archive = ARCHIVES[name]
  fix = (f"Delete {path} to download it again, or replace it with "
         f"{archive.url} (md5 {archive.md5}).")
  digest = md5sum(path)
  if digest != archive.md5:
    raise ValueError(f"{path} has md5 {digest}, expected {archive.md5}: it is "
                     f"not the official {name} archive or is incomplete. " + fix)
  splits = []
  try:
    with tarfile.open(path, "r:gz") as tar:
      for members in (archive.train_members, archive.test_members):
        parts = [_read_batch(tar, m, archive.label_key) for m in members]
        splits += [np.concatenate([p[0] for p in parts]),
                   np.concatenate([p[1] for p in parts])]
  except (tarfile.TarError, OSError, EOFError, KeyError, ValueError,
          pickle.UnpicklingError) as e:
    raise ValueError(f"Cannot read {name} from {path} ({type(e).__name__}: "
                     f"{e}). " + fix) from e
  for y in (splits[1], splits[3]):
    if len(y) and (y.min() < 0 or y.max() >= archive.num_classes):
      raise ValueError(f"{path} has labels outside 0..{archive.num_classes - 1}."
                       f" " + fix)
  for a in splits:
    a.flags.writeable = False  # Shared through the cache.
  return tuple(splits)


def load_cifar(name: str, data_dir: str | None = None, download: bool = True
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(x_train, y_train, x_test, y_test)`` of ``"cifar10"`` / ``"cifar100"``.

  ``x`` is uint8 ``(N, 32, 32, 3)`` NHWC RGB, ``y`` int32 ``(N,)`` (fine labels
  for CIFAR-100). Read-only arrays, cached per process.

  Raises:
    ValueError: see :func:`archive_path`; a corrupt or foreign archive.
  """
  path = archive_path(name, data_dir, download)
  st = os.stat(path)
  return _load(path, name, st.st_size, st.st_mtime_ns)
