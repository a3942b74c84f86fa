"""Image files on disk: torchvision ImageFolder trees and ``path label`` list files.

Two ways to name the files of a split:

* :func:`index_image_folder`: ``SPLIT_DIR/<class>/**/<file>`` exactly as
  torchvision's ``ImageFolder``: class ``k`` is the ``k``-th of the sorted
  sub-folder names (``os.scandir`` entries that are directories), files are
  found as ``os.walk(followlinks=True)`` does in sorted order and kept when
  their lower-cased name ends with one of :data:`IMG_EXTENSIONS`. So class
  indices (and sample order) match checkpoints of the official PyTorch code.
  Unlike ``os.walk``, a folder or file reached twice through links (same
  ``(st_dev, st_ino)``) is indexed once, so a symlink loop ends.
* :func:`index_file_list`: a root folder plus a list file of
  ``relative/path label`` lines, as the official IR-Net ImageNet config
  (``train_root`` / ``train_source``). Every listed file must exist.

Indexing ImageNet (1.28M files in 1000 folders) walks every folder once; the
result is cached (:mod:`irnet_jax.data.index_cache`) and reused while no
folder involved changed (its mtime), so a restart does not rescan.

The index stores the relative paths as one UTF-8 byte blob plus offsets
(numpy arrays), so it pickles to grain worker processes in milliseconds.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Iterable, NoReturn, Sequence

import numpy as np

from irnet_jax.data import decode, index_cache

# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif",
                  ".tiff", ".webp")
_MAX_LISTED = 5  # Problems listed in one error message.

log = logging.getLogger(__name__)


def _encode_names(names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """Strings -> (uint8 blob, int64 offsets of length ``len(names) + 1``)."""
  encoded = [n.encode("utf-8", "surrogateescape") for n in names]
  offsets = np.zeros(len(encoded) + 1, np.int64)
  np.cumsum([len(e) for e in encoded], out=offsets[1:])
  return np.frombuffer(b"".join(encoded), np.uint8).copy(), offsets


def _decode_names(blob: np.ndarray, offsets: np.ndarray) -> list[str]:
  data = blob.tobytes()
  return [data[offsets[i]:offsets[i + 1]].decode("utf-8", "surrogateescape")
          for i in range(len(offsets) - 1)]


@dataclasses.dataclass(frozen=True, eq=False)
class FileIndex:
  """The files of one split and their labels.

  Attributes:
    root: directory the relative paths are joined to.
    blob, offsets: relative path ``i`` is ``blob[offsets[i]:offsets[i+1]]``
      (UTF-8 bytes, undecodable file-name bytes kept by ``surrogateescape``).
    labels: int32 ``(N,)`` class ids.
    classes: class folder names (ImageFolder) or ``()`` (list file).
  """
  root: str
  blob: np.ndarray
  offsets: np.ndarray
  labels: np.ndarray
  classes: tuple[str, ...] = ()

  @classmethod
  def from_names(cls, root: str, names: Sequence[str], labels: Iterable[int],
                 classes: Sequence[str] = ()) -> "FileIndex":
    blob, offsets = _encode_names(names)
    return cls(root, blob, offsets, np.asarray(list(labels), np.int32),
               tuple(classes))

  def __len__(self) -> int:
    return len(self.labels)

  def relpath(self, index: int) -> str:
    start, stop = self.offsets[index], self.offsets[index + 1]
    return self.blob[start:stop].tobytes().decode("utf-8", "surrogateescape")

  def path(self, index: int) -> str:
    return os.path.join(self.root, self.relpath(index))

  def relpaths(self) -> list[str]:
    return _decode_names(self.blob, self.offsets)

  def sample_sizes(self, limit: int = 256) -> list[tuple[tuple[int, int], str]]:
    """``((height, width), path)`` of up to ``limit`` files spread evenly over the
    index (the first and the last included), read from their headers only (~15 us a
    file from the page cache). Files that cannot be read are left out: they fail, or
    are replaced (``dataset.skip_bad_files``), when decoded.
    """
    n = len(self)
    picks = sorted(set(np.linspace(0, n - 1, min(n, limit)).round().astype(int)))
    found = []
    for i in picks:
      try:
        found.append((decode.image_size(self.path(i)), self.path(i)))
      except decode.BadImageError:
        continue
    return found


class FileSource:
  """Random-access source over image files: ``source[i] -> dict(image=uint8
  (H, W, 3) RGB of the stored size, label=int)``.

  :meth:`read` / :meth:`path` / :meth:`label` give the parts without decoding,
  so a pipeline can decode in its own stage (e.g. with ``draft_to``).
  """

  def __init__(self, index: FileIndex):
    self.index = index

  def __len__(self) -> int:
    return len(self.index)

  def path(self, index: int) -> str:
    return self.index.path(index)

  def label(self, index: int) -> int:
    return int(self.index.labels[index])

  def read(self, index: int) -> bytes:
    """The encoded file; raises :class:`decode.BadImageError` if unreadable."""
    return decode.read_file(self.index.path(index))

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.index.path(index)
    return {"image": decode.load_image(path), "label": self.label(index)}

  def __repr__(self) -> str:
    return f"FileSource(n={len(self)}, root={self.index.root!r})"


# ----------------------------------------------------------------------------
# ImageFolder trees


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMG_EXTENSIONS)


def _dir_id(path: str) -> tuple[int, int]:
  """``(st_dev, st_ino)`` of a folder (links followed): its identity however
  reached."""
  try:
    st = os.stat(path)
  except OSError as e:
    _raise(e)
  return st.st_dev, st.st_ino


def _file_id(entry: os.DirEntry, dev: int) -> tuple[int, int] | None:
  """``(st_dev, st_ino)`` of a listed file in a folder on device ``dev``, or
  None for a dangling link (kept: it fails, named, when decoded)."""
  if not entry.is_symlink():
    # Free: the inode comes with the listing (1.28M stats saved on ImageNet).
    return dev, entry.inode()
  try:
    st = os.stat(entry.path)
  except OSError:
    return None
  return st.st_dev, st.st_ino


def _walk_images(class_dir: str, seen: set[tuple[int, int]]
                 ) -> tuple[list[tuple[str, list[str]]], list[str], int]:
  """The image files under ``class_dir``, each folder and file taken once.

  What ``os.walk(class_dir, followlinks=True)`` yields, except that a folder
  already walked (same ``(st_dev, st_ino)``, in ``seen`` or met earlier) is not
  walked again, so a symlink loop ends and a folder linked twice counts once;
  a file reached twice (a symlink or hard link to an indexed file) counts once
  too. Real paths win over symlinks: folders reachable without symlinks are
  walked first, then the targets of symlinks in the order met (one link deeper
  per round), and a symlinked file is dropped when its target is indexed.
  ``seen`` is updated.

  Returns:
    ``(folder, sorted image file names)`` pairs sorted by folder (torchvision
    sorts ``os.walk``'s tuples), every folder walked, and the number of folders
    and files skipped as reached before.
  """
  # (folder, [(file name, file id, is it a symlink)]) of every folder walked.
  listed: list[tuple[str, list[tuple[str, tuple[int, int] | None, bool]]]]
  listed = []
  walked: list[str] = []
  skipped = 0
  pending = [class_dir]
  while pending:
    links: list[str] = []
    for start in pending:
      stack = [start]
      while stack:
        folder = stack.pop()
        ident = _dir_id(folder)
        if ident in seen:
          skipped += 1
          continue
        seen.add(ident)
        walked.append(folder)
        try:
          with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
          _raise(e)
        subdirs, images = [], []
        for entry in entries:
          try:
            is_dir = entry.is_dir()  # Follows links, as os.walk.
          except OSError:
            is_dir = False
          if is_dir:
            (links if entry.is_symlink() else subdirs).append(entry.path)
          elif _is_image(entry.name):
            images.append((entry.name, _file_id(entry, ident[0]),
                           entry.is_symlink()))
        listed.append((folder, images))
        stack.extend(reversed(subdirs))  # Popped in sorted order.
    pending = links
  listed.sort(key=lambda item: item[0])
  # Real files first, then symlinked ones, each in the final order.
  kept: set[tuple[int, int]] = set()
  dropped: set[tuple[int, int]] = set()
  for want_link in (False, True):
    for i, (_, images) in enumerate(listed):
      for j, (_, file_id, is_link) in enumerate(images):
        if is_link != want_link or file_id is None:
          continue
        if file_id in kept:
          dropped.add((i, j))
        kept.add(file_id)
  found = [(folder, [name for j, (name, _, _) in enumerate(images)
                     if (i, j) not in dropped])
           for i, (folder, images) in enumerate(listed)]
  return found, walked, skipped + len(dropped)


def _scan_image_folder(split_dir: str) -> tuple[FileIndex, list[str]]:
  """Walks the tree (no cache); returns the index and every directory walked."""
  try:
    with os.scandir(split_dir) as it:
      classes = sorted(e.name for e in it if e.is_dir())
  except OSError as e:
    raise ValueError(f"Cannot list the image folder {split_dir!r} ({e}). Check "
                     f"the path and its permissions.") from e
  if not classes:
    raise ValueError(f"{split_dir!r} has no class sub-folders. An image folder "
                     f"holds one folder per class with the images inside "
                     f"({split_dir}/<class>/<image>.JPEG), as torchvision's "
                     f"ImageFolder.")
  class_dirs = [os.path.join(split_dir, cls) for cls in classes]
  # A link from inside a class back to the split folder or into another class
  # folder would re-index that class's images under this label: skipped.
  tops = {_dir_id(split_dir)} | {_dir_id(d) for d in class_dirs}
  names, labels, dirs, empty, skipped = [], [], [split_dir], [], 0
  for label, (cls, class_dir) in enumerate(zip(classes, class_dirs)):
    count = len(names)
    found, walked, again = _walk_images(class_dir, tops - {_dir_id(class_dir)})
    dirs += walked
    skipped += again
    for root, files in found:
      rel = os.path.relpath(root, split_dir)
      names += [os.path.join(rel, f) for f in files]
      labels += [label] * len(files)
    if len(names) == count:
      empty.append(cls)
  if skipped:
    log.warning("%s: %d folder(s) or file(s) reached again through symbolic or "
                "hard links (a link loop, or two links to one place) were "
                "indexed once.", split_dir, skipped)
  if empty:
    shown = ", ".join(repr(c) for c in empty[:_MAX_LISTED])
    more = f" and {len(empty) - _MAX_LISTED} more" if len(empty) > _MAX_LISTED else ""
    raise ValueError(f"{len(empty)} class folder(s) of {split_dir!r} hold no "
                     f"image files ({shown}{more}); images end in "
                     f"{'/'.join(IMG_EXTENSIONS)} (any case). Remove the empty "
                     f"folders or add their images: the class ids are the "
                     f"positions of the folder names in sorted order, as "
                     f"torchvision's ImageFolder.")
  return FileIndex.from_names(split_dir, names, labels, classes), dirs


def _raise(error: OSError) -> NoReturn:
  raise ValueError(f"Cannot list {error.filename!r} ({error.strerror}). Check "
                   f"its permissions.") from error


def index_image_folder(split_dir: str, cache: bool = True) -> FileIndex:
  """Index of a torchvision ``ImageFolder`` tree (see the module docstring).

  Args:
    split_dir: the folder holding one sub-folder per class.
    cache: reuse / write the cached index (see :mod:`index_cache`).

  Raises:
    ValueError: missing or unreadable folder, no class folders, a class
      folder without images.
  """
  if not os.path.isdir(split_dir):
    raise ValueError(f"Image folder {split_dir!r} does not exist or is not a "
                     f"directory.")
  split_dir = os.path.abspath(split_dir)
  key = ("imagefolder", split_dir, IMG_EXTENSIONS)
  anchor = os.path.dirname(split_dir)
  if cache:
    hit = index_cache.load(key, anchor)
    if hit is not None:
      return FileIndex(*hit)
  start = time.time_ns()
  index, dirs = _scan_image_folder(split_dir)
  if cache:
    index_cache.store(key, anchor, index, dirs, scan_start_ns=start)
  return index


# ----------------------------------------------------------------------------
# list files


def _parse_list(list_path: str) -> tuple[list[str], list[int], list[int]]:
  """``relative/path label`` lines -> (paths, labels, line numbers)."""
  try:
    with open(list_path, encoding="utf-8", errors="surrogateescape") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise ValueError(f"Cannot read the list file {list_path!r} ({e}).") from e
  names, labels, numbers, bad = [], [], [], []
  for number, line in enumerate(lines, 1):
    line = line.strip()
    if not line:
      continue
    # rsplit: file names may contain spaces, the label is the last field.
    parts = line.rsplit(None, 1)
    try:
      label = int(parts[1])
    except (IndexError, ValueError):
      bad.append(number)
      continue
    if label < 0:
      bad.append(number)
      continue
    names.append(parts[0])
    labels.append(label)
    numbers.append(number)
  if bad:
    raise ValueError(f"{list_path}:{bad[0]}: malformed line {lines[bad[0] - 1]!r}"
                     f" ({len(bad)} malformed line(s) in all, first at lines "
                     f"{bad[:_MAX_LISTED]}). Each line must be "
                     f"'relative/path/to/image.JPEG LABEL' with LABEL a class id "
                     f">= 0.")
  if not names:
    raise ValueError(f"The list file {list_path!r} names no images. Each line "
                     f"must be 'relative/path/to/image.JPEG LABEL'.")
  return names, labels, numbers


def _check_listed_files(root: str, names: list[str], numbers: list[int],
                        list_path: str) -> list[str]:
  """Every listed file exists; one directory listing per folder (fast for
  1.28M files in 1000 folders). Returns the folders listed."""
  by_dir: dict[str, set[str] | None] = {}
  missing = []
  for name, number in zip(names, numbers):
    folder, base = os.path.split(os.path.join(root, name))
    if folder not in by_dir:
      try:
        with os.scandir(folder or ".") as it:
          by_dir[folder] = {e.name for e in it}
      except OSError:
        by_dir[folder] = None
    present = by_dir[folder]
    if present is None or base not in present:
      missing.append((number, name))
  if missing:
    shown = "; ".join(f"line {n}: {p!r}" for n, p in missing[:_MAX_LISTED])
    raise ValueError(f"{len(missing)} file(s) named in {list_path!r} do not "
                     f"exist under the root {root!r} ({shown}). Fix the list "
                     f"or the root (dataset.path, or dataset.train_root / "
                     f"dataset.test_root).")
  return sorted(by_dir)


def index_file_list(root: str, list_path: str, cache: bool = True) -> FileIndex:
  """Index of a list file of ``relative/path label`` lines under ``root``.

  Raises:
    ValueError: missing root or list, malformed lines (with the line number),
      a listed file that does not exist.
  """
  if not os.path.isdir(root):
    raise ValueError(f"The image root {root!r} does not exist or is not a "
                     f"directory (set dataset.path, or dataset.train_root / "
                     f"dataset.test_root).")
  if not os.path.isfile(list_path):
    raise ValueError(f"The list file {list_path!r} does not exist (set "
                     f"dataset.train_list / dataset.test_list).")
  root, list_path = os.path.abspath(root), os.path.abspath(list_path)
  key = ("filelist", root, list_path)
  anchor = os.path.dirname(list_path)
  if cache:
    hit = index_cache.load(key, anchor, files=[list_path])
    if hit is not None:
      return FileIndex(*hit)
  start = time.time_ns()
  names, labels, numbers = _parse_list(list_path)
  dirs = _check_listed_files(root, names, numbers, list_path)
  index = FileIndex.from_names(root, names, labels)
  if cache:
    index_cache.store(key, anchor, index, dirs, files=[list_path],
                      scan_start_ns=start)
  return index
