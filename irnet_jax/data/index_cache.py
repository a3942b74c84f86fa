"""On-disk cache of file indexes, invalidated when the indexed folders change.

An entry is an ``.npz`` (read with ``allow_pickle=False``: a cache file shared
in a dataset tree cannot run code) holding the :class:`~irnet_jax.data.folders.
FileIndex` arrays and a JSON header with the folders and files it depends on
and their ``st_mtime_ns`` (and sizes for files). Adding, removing or renaming
an image changes the mtime of its folder, so a stale entry is detected with one
``stat`` per folder (about 1,000 for ImageNet) instead of a rescan.

Entries live in ``<anchor>/.irnet_jax_index/`` (the dataset root for
ImageFolder trees, the list file's folder for list files), shared by every
user and host of the tree; where that is not writable, in
``$XDG_CACHE_HOME/irnet_jax/index`` (default ``~/.cache/irnet_jax/index``).
Writes go to a temporary file renamed into place, so readers never see a
partial entry and concurrent writers do not corrupt each other.

Folders (or list files) modified less than :data:`RACY_SECONDS` before the scan
started are not cached: a change in the same clock tick as the scan (or hidden
by clock skew on a network file system) would leave the mtime unchanged and a
stale entry valid. Such a tree is simply rescanned until it has settled.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from typing import Any, NamedTuple, Sequence

import numpy as np

# 2: ImageFolder scans take each folder and file once (links, loops), so an
# index of version 1 may hold a file twice: rescanned once.
VERSION = 2
TREE_DIR = ".irnet_jax_index"
RACY_SECONDS = 2.0

log = logging.getLogger(__name__)


def user_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
      os.path.expanduser("~"), ".cache")
  return os.path.join(base, "irnet_jax", "index")


def _locations(key: tuple[Any, ...], anchor: str) -> list[str]:
  digest = hashlib.sha256(repr(key).encode("utf-8", "surrogateescape"))
  name = f"{key[0]}-{digest.hexdigest()[:20]}.npz"
  return [os.path.join(anchor, TREE_DIR, name),
          os.path.join(user_cache_dir(), name)]


def _dir_mtimes(dirs: Sequence[str]) -> list[int]:
  return [os.stat(d).st_mtime_ns for d in dirs]


def _file_stats(files: Sequence[str]) -> list[list[int]]:
  stats = [os.stat(f) for f in files]
  return [[s.st_size, s.st_mtime_ns] for s in stats]


class Entry(NamedTuple):
  """The arrays of a cached ``FileIndex`` (see its attributes)."""
  root: str
  blob: np.ndarray
  offsets: np.ndarray
  labels: np.ndarray
  classes: tuple[str, ...]


def load(key: tuple[Any, ...], anchor: str,
         files: Sequence[str] = ()) -> Entry | None:
  """The cached entry for ``key`` if one exists and is still valid, else None.

  ``files`` must equal what :func:`store` was given (checked by size + mtime).
  """
  for path in _locations(key, anchor):
    try:
      with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(npz["meta"].tobytes().decode("utf-8"))
        if (meta.get("version") != VERSION or meta.get("key") != repr(key)
            or meta["files"] != _file_stats(files)
            or meta["mtimes"] != _dir_mtimes(meta["dirs"])):
          continue
        return Entry(meta["root"], npz["blob"], npz["offsets"], npz["labels"],
                     tuple(meta["classes"]))
    except (OSError, ValueError, KeyError, TypeError):
      continue  # Missing, unreadable, from an older version, or a dir vanished.
  return None


def store(key: tuple[Any, ...], anchor: str, index: Any, dirs: Sequence[str],
          files: Sequence[str] = (), scan_start_ns: int | None = None
          ) -> str | None:
  """Writes ``index`` (a ``FileIndex`` or :class:`Entry`) for ``key``; returns
  the path written.

  ``dirs``: every folder whose listing the index depends on. ``scan_start_ns``:
  ``time.time_ns()`` before the scan began; if a folder or file changed within
  :data:`RACY_SECONDS` of it, nothing is written (see the module docstring).
  Failing to write (read-only tree and home) only logs a warning: the cache is
  an optimization.
  """
  if scan_start_ns is not None:
    newest = max(_dir_mtimes(dirs) + [m for _, m in _file_stats(files)])
    if newest > scan_start_ns - RACY_SECONDS * 1e9:
      log.info("not caching the index of %s: modified just now", key[1])
      return None
  for path in _locations(key, anchor):
    folder = os.path.dirname(path)
    try:
      # The folder first: creating it may change the mtime of a folder in
      # ``dirs`` (a list file next to its images), which is then stat'ed after.
      os.makedirs(folder, exist_ok=True)
      meta = {"version": VERSION, "key": repr(key), "root": index.root,
              "classes": list(index.classes), "dirs": list(dirs),
              "mtimes": _dir_mtimes(dirs), "files": _file_stats(files)}
      fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
      try:
        with os.fdopen(fd, "wb") as f:
          np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
                   blob=index.blob, offsets=index.offsets, labels=index.labels)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private (0600).
        os.replace(tmp, path)
      finally:
        if os.path.exists(tmp):
          os.unlink(tmp)
      return path
    except OSError as e:
      log.info("cannot write the index cache %s (%s)", path, e)
  log.warning("could not cache the file index of %s; it will be rebuilt next "
              "time", key[1])
  return None
