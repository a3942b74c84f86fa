"""Random-access image classification sources (no TensorFlow needed).

A *source* is any object with ``__len__`` and ``__getitem__(i) -> dict(image=uint8
(H, W, 3) NHWC-style HWC array in [0, 255], label=int)``; grain reads it directly
with ``grain.MapDataset.source``. Supported ``ds_cfg.name`` values:

* ``cifar10`` / ``cifar100``: the official python-version archives, downloaded
  once into ``ds_cfg.data_dir`` (default ``$IRNET_JAX_DATA_DIR`` or
  ``~/.cache/irnet_jax/data``), see :mod:`irnet_jax.data.cifar`.
* ``imagefolder``: JPEG/PNG files in ``ds_cfg.path/<train_split>/<class>/`` and
  ``ds_cfg.path/<test_split>/<class>/`` (default ``train`` / ``val``), or in
  ``ds_cfg.train_root/<class>/`` and ``ds_cfg.test_root/<class>/`` when those
  are set; class ids as torchvision's ImageFolder (sorted folder names), see
  :mod:`irnet_jax.data.folders`.
* ``filelist``: list files ``ds_cfg.train_list`` / ``ds_cfg.test_list`` of
  ``relative/path label`` lines, paths relative to ``ds_cfg.train_root`` /
  ``ds_cfg.test_root`` (default ``ds_cfg.path``), as the official IR-Net
  ImageNet config (``train_root``/``train_source``, ``val_root``/``val_source``).
* ``tfds:NAME`` (``tfds:cifar10``, ``tfds:imagenet2012``, ...; plain
  ``imagenet2012`` is the same as ``tfds:imagenet2012``): ``tfds.data_source``
  over a TFDS directory prepared once in the ``array_record`` format. Reading
  needs no TensorFlow; only the one-off ``tfds build`` does. The labels of
  ``imagenet2012`` are the sorted WordNet ids, i.e. the same class ids as an
  ImageFolder tree of ``n01440764/``-style folders.
* ``npz``: a local ``.npz`` with ``x_train, y_train, x_test, y_test``; ``x`` is
  uint8 ``(N, H, W, 3)``, ``(N, H, W, 1)`` or ``(N, H, W)`` (grey is repeated to
  3 channels), ``y`` integer class ids ``(N,)``: ``0..C-1`` with ``C = max(y_train)
  + 1``, checked on first read with the zip's CRC-32 of every array. Read once
  per process while the file is unchanged (as the CIFAR archives and digits).
* ``digits``: scikit-learn's embedded 8x8 handwritten digits, upsampled to
  16x16 RGB. Works offline; meant for smoke tests and CPU-sized experiments.

Each name is one row of :data:`SOURCES` (:class:`SourceSpec`: how to open and
inspect it, whether it is held in memory, its class count and default eval split),
which every dispatcher reads. Everything that can be checked without reading the
pixels is checked in :func:`inspect_sources`, which raises ``ValueError`` with the
problem and the fix.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import zipfile
import zlib
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from irnet_jax.data import cifar, folders

TFDS_PREFIX = "tfds:"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")

DIGITS_NUM_TEST = 360  # 20% of the 1797 scikit-learn digits.
DIGITS_SIDE = 16  # 8x8 upsampled x2 by pixel repetition.


def cfg_get(ds_cfg: Any, name: str, default: Any = None) -> Any:
  """``getattr`` that also works for dicts and ``ml_collections.ConfigDict``."""
  if isinstance(ds_cfg, Mapping):
    return ds_cfg.get(name, default)
  return getattr(ds_cfg, name, default)


def tfds_name(name: str) -> str | None:
  """The TFDS dataset behind ``ds_cfg.name``, or None for the other sources."""
  name = ALIASES.get(name, name)
  if isinstance(name, str) and name.startswith(TFDS_PREFIX):
    return name[len(TFDS_PREFIX):] or None
  return None


def eval_split_name(ds_cfg: Any) -> str:
  """The split used for evaluation (``ds_cfg.test_split`` or the source's default)."""
  split = cfg_get(ds_cfg, "test_split")
  return split or source_spec(cfg_get(ds_cfg, "name")).test_split


def train_split_name(ds_cfg: Any) -> str:
  return cfg_get(ds_cfg, "train_split") or "train"


def to_rgb_uint8(image: np.ndarray) -> np.ndarray:
  """``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)`` uint8 -> ``(H, W, 3)`` uint8."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  return image


class ArraySource:
  """Random-access source over in-memory arrays.

  Args:
    images: uint8 ``(N, H, W, 3)``.
    labels: integer ``(N,)``.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    if len(images) != len(labels):
      raise ValueError(f"{len(images)} images but {len(labels)} labels.")
    self.images = images
    self.labels = labels

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, index: int) -> dict[str, Any]:
    # Views, not copies: the augmentations never write into their input.
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return f"ArraySource(n={len(self)}, image_shape={self.images.shape[1:]})"


class TfdsSource:
  """Adapts a ``tfds.data_source`` split to ``dict(image=uint8 HWC, label=int)``.

  Drops the other features (``id``, ``file_name``) so batches stack cleanly.
  """

  def __init__(self, data_source: Sequence[Mapping[str, Any]]):
    self.data_source = data_source

  def __len__(self) -> int:
    return len(self.data_source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self.data_source[index]
    return {"image": to_rgb_uint8(example["image"]),
            "label": int(example["label"])}

  def __repr__(self) -> str:
    return f"TfdsSource(n={len(self)})"


@dataclasses.dataclass(frozen=True)
class SourceInfo:
  """What :func:`inspect_sources` learns without decoding images.

  Attributes:
    num_train, num_test: number of examples in the train / eval split.
    num_classes: number of label values.
    stored_shape: ``(H, W, 3)`` of the stored images; ``H, W`` are ``None`` for
      variable-sized images (ImageNet).
  """
  num_train: int
  num_test: int
  num_classes: int
  stored_shape: tuple[int | None, int | None, int]


@dataclasses.dataclass(frozen=True)
class ClassIds:
  """The distinct labels of a dataset whose class count comes from its labels.

  Attributes:
    ids: the distinct label values of both splits, sorted.
    counts: how many examples carry each of them.
    where: where they were read, as the messages start (``"y_train and y_test in
      'x.npz'"``).
  """
  ids: np.ndarray
  counts: np.ndarray
  where: str


# When config.model.num_classes=-1, the class count is the largest label + 1. A label
# set is refused then when more than half of the class ids 0..max would have no example
# AND more than this many would: those labels are not class ids 0..C-1 (a stray value
# such as 3,000,000 among 0..9, which built a 3,000,001-class model with a 1.4 GB
# checkpoint; an 'ignore' label 255; ids of another numbering), and most of the model's
# outputs would never be trained. A few gaps are fine (an unused id costs one row of
# the classifier): 1-based ids, a dropped class, a small subset of a larger set.
MAX_EMPTY_CLASSES = 16


def _format_ids(ids: np.ndarray, head: int = 8, tail: int = 3) -> str:
  values = [str(int(v)) for v in ids]
  if len(values) > head + tail + 1:
    values = values[:head] + ["..."] + values[-tail:]
  return ", ".join(values)


def check_class_ids(class_ids: ClassIds) -> int:
  """``max label + 1``, the class count taken from the data; ``ValueError`` when most
  of those classes would have no example (see :data:`MAX_EMPTY_CLASSES`)."""
  ids, counts = class_ids.ids, class_ids.counts
  top, distinct = int(ids[-1]), len(ids)
  empty = top + 1 - distinct
  if empty > distinct and empty > MAX_EMPTY_CLASSES:
    raise ValueError(
        f"{class_ids.where} hold {distinct} distinct labels ({_format_ids(ids)}) but the "
        f"largest, {top} ({int(counts[-1])} example(s)), makes {top + 1} classes when "
        f"config.model.num_classes=-1 takes the count from the data: {empty} of them "
        f"would have no example. Fix the labels (class ids 0..C-1), or set "
        f"--config.model.num_classes={top + 1} if you really mean {top + 1} classes.")
  return top + 1


# ----------------------------------------------------------------------------
# digits


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                  np.ndarray]:
  """scikit-learn digits as ``(x_train, y_train, x_test, y_test)``.

  ``x`` is uint8 ``(N, 16, 16, 3)``: values 0..16 are rescaled to 0..255
  (``round(v * 255 / 16)``), each pixel repeated 2x2 (nearest-neighbour), grey
  replicated to RGB. A fixed permutation (``default_rng(0)``) puts the last 360
  images (20%) in the test split. Cached: the result is read-only.
  """
  # Imported lazily: scikit-learn takes ~1 s to import and only this needs it.
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8)
  x = np.repeat(np.repeat(x, 2, axis=1), 2, axis=2)
  x = np.repeat(x[..., None], 3, axis=-1)
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(0).permutation(len(x))
  x, y = x[perm], y[perm]
  cut = len(x) - DIGITS_NUM_TEST
  arrays = (x[:cut], y[:cut], x[cut:], y[cut:])
  for a in arrays:
    a.flags.writeable = False  # Shared through the cache.
  return arrays


# ----------------------------------------------------------------------------
# npz


def _npz_fix(path: str) -> str:
  return (f"Set --config.dataset.path to an .npz made with np.savez(path, x_train=..., "
          f"y_train=..., x_test=..., y_test=...) where x is uint8 (N,H,W,3), "
          f"(N,H,W,1) or (N,H,W) and y is integer (N,) (got path={path!r}).")


def _npz_damaged_member(path: str) -> tuple[str, str] | None:
  """``(member, error)`` of the first array of the npz whose bytes fail the zip's
  CRC-32 (or, compressed, do not decompress); None when every array reads back.

  Reads the whole file once per file version and process (cached with the rest of
  the inspection): on a 185 MB npz of (50000, 32, 32, 3) uint8 (CIFAR-10's size,
  np.savez) 0.044-0.059 s from the page cache on one core of a Xeon (0.08 s to
  inflate the same arrays from np.savez_compressed); from a cold disk, the time to
  read the file, after which the training's own read finds it in the page cache.
  Without it a flipped bit passed the inspection and the run failed with a
  traceback (zipfile.BadZipFile: Bad CRC-32) after its workdir was made.
  """
  with zipfile.ZipFile(path) as zf:
    for info in zf.infolist():
      try:
        with zf.open(info) as f:
          while f.read(1 << 24):
            pass
      except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        return info.filename, str(e)
  return None


def _npz_headers(path: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of the arrays in an ``.npz`` without reading the data."""
  headers = {}
  with zipfile.ZipFile(path) as zf:
    for member in zf.namelist():
      if not member.endswith(".npy"):
        continue
      with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
          shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:
          shape, _, dtype = np.lib.format.read_array_header_2_0(f)
      headers[member[:-len(".npy")]] = (tuple(shape), np.dtype(dtype))
  return headers


def _npz_file_key(path: str) -> tuple[str, int, int]:
  """``(absolute path, st_mtime_ns, st_size)``: the in-process caches below
  re-read a file that was replaced or rewritten, and only then."""
  st = os.stat(path)
  return os.path.abspath(path), st.st_mtime_ns, st.st_size


def _check_npz(path: str | None) -> tuple[dict[str, Any], int, ClassIds]:
  """Validates the npz (its zip checksums, layout and labels); returns its headers,
  the number of classes and its class ids. Reads the file once per process while
  it is unchanged."""
  if not path:
    raise ValueError("--config.dataset.name=npz needs --config.dataset.path, which is empty. "
                     + _npz_fix(path))
  if not os.path.isfile(path):
    raise ValueError(f"npz file {path!r} does not exist. " + _npz_fix(path))
  return _checked_npz(path, *_npz_file_key(path))


@functools.lru_cache(maxsize=8)
def _checked_npz(path: str, abspath: str, mtime_ns: int, size: int
                 ) -> tuple[dict[str, Any], int, ClassIds]:
  """:func:`_check_npz` of an existing file (``path`` as the user gave it, for
  messages); cached per file version (errors are not cached)."""
  del abspath, mtime_ns, size  # The cache key only.
  try:
    damaged = _npz_damaged_member(path)
    headers = _npz_headers(path)
  except (zipfile.BadZipFile, ValueError, OSError) as e:
    raise ValueError(f"{path!r} is not a readable .npz file ({e}). "
                     + _npz_fix(path)) from e
  if damaged:
    member, error = damaged
    raise ValueError(f"npz file {path!r} is damaged: its array {member!r} fails the zip "
                     f"archive's check ({error}), so the bytes on disk are not the ones "
                     f"that were saved (a bit flip, or a broken copy or download). "
                     f"Re-download or re-create the file (np.savez) and run again.")
  missing = [k for k in NPZ_KEYS if k not in headers]
  if missing:
    raise ValueError(f"npz file {path!r} lacks the arrays {missing} (it has "
                     f"{sorted(headers)}). " + _npz_fix(path))
  hw = None
  for split in ("train", "test"):
    (xs, xd), (ys, yd) = headers[f"x_{split}"], headers[f"y_{split}"]
    if xd != np.uint8:
      raise ValueError(f"x_{split} in {path!r} has dtype {xd}, expected uint8 "
                       f"in [0, 255]. " + _npz_fix(path))
    if not (len(xs) == 3 or (len(xs) == 4 and xs[-1] in (1, 3))):
      raise ValueError(f"x_{split} in {path!r} has shape {xs}, expected "
                       f"(N,H,W,3), (N,H,W,1) or (N,H,W). " + _npz_fix(path))
    if not np.issubdtype(yd, np.integer) or len(ys) != 1:
      raise ValueError(f"y_{split} in {path!r} is {yd} {ys}, expected integer "
                       f"class ids of shape (N,). " + _npz_fix(path))
    if ys[0] != xs[0] or xs[0] == 0:
      raise ValueError(f"x_{split} {xs} and y_{split} {ys} in {path!r} must "
                       f"have the same non-zero length. " + _npz_fix(path))
    if hw is not None and xs[1:3] != hw:
      raise ValueError(f"x_train and x_test in {path!r} differ in image size "
                       f"({hw} vs {xs[1:3]}). " + _npz_fix(path))
    hw = xs[1:3]
  # Labels are small, so reading them here keeps dataset_info cheap.
  with np.load(path) as npz:
    y_train, y_test = npz["y_train"], npz["y_test"]
  num_classes = _check_npz_labels(path, y_train, y_test)
  ids, counts = np.unique(np.concatenate([y_train.ravel(), y_test.ravel()]),
                          return_counts=True)
  return headers, num_classes, ClassIds(ids, counts, f"y_train and y_test in {path!r}")


def _check_npz_labels(path: str, y_train: np.ndarray, y_test: np.ndarray
                      ) -> int:
  """The number of classes, ``max(y_train) + 1``, once every label is a class
  id in ``[0, num_classes)`` (they become int32 in the batches)."""
  fix = ("Number the classes 0..C-1, the same way in y_train and y_test, with "
         "every class in y_train, and save the .npz again.")
  for name, y in (("y_train", y_train), ("y_test", y_test)):
    low = int(y.min())
    if low < 0:
      raise ValueError(f"{name} in {path!r} has the negative label {low}; "
                       f"labels are class ids >= 0. " + fix)
  top = int(y_train.max())
  if top >= np.iinfo(np.int32).max:
    raise ValueError(f"y_train in {path!r} has the label {top}, too large for "
                     f"a class id (it would make {top + 1} classes). " + fix)
  beyond = y_test[y_test > top]
  if beyond.size:
    raise ValueError(f"y_test in {path!r} has the label {int(beyond.max())} "
                     f"({beyond.size} label(s) in all beyond y_train's) but "
                     f"the labels of y_train stop at {top}, so num_classes="
                     f"{top + 1} and the model would never train that class. "
                     + fix)
  return top + 1


def _load_npz_arrays(path: str) -> tuple[np.ndarray, ...]:
  """Reads an npz (validated by :func:`_check_npz`) into RGB uint8 arrays.

  Cached per process while the file is unchanged (``get_sources`` runs at
  every evaluation): the arrays are read-only, shared by every caller.
  """
  return _npz_arrays(path, *_npz_file_key(path))


# One entry: a second file (say the eval set of another run) replaces the
# first rather than keeping two datasets in memory.
@functools.lru_cache(maxsize=1)
def _npz_arrays(path: str, abspath: str, mtime_ns: int, size: int
                ) -> tuple[np.ndarray, ...]:
  del abspath, mtime_ns, size  # The cache key only.
  with np.load(path) as npz:
    arrays = []
    for split in ("train", "test"):
      x = npz[f"x_{split}"]
      if x.ndim == 3:
        x = x[..., None]
      if x.shape[-1] == 1:
        # Done once here rather than per example so batches are cheap.
        x = np.repeat(x, 3, axis=-1)
      arrays += [np.ascontiguousarray(x), npz[f"y_{split}"].astype(np.int32)]
  for a in arrays:
    a.flags.writeable = False  # Shared through the cache.
  return tuple(arrays)


# ----------------------------------------------------------------------------
# tfds


def _default_data_dir() -> str:
  # What tfds uses when data_dir is None (without importing tfds).
  return os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")


def _tfds_prepare_hint(name: str, data_dir: str | None) -> str:
  shown = data_dir or _default_data_dir()
  hint = (f"Prepare it once with `pip install tensorflow && tfds build {name} "
          f"--data_dir={shown} --file_format=array_record` (TensorFlow is only "
          f"needed for this one-off build; the array_record format is what "
          f"random access needs)")
  if name == "imagenet2012":
    hint += (f"; ImageNet cannot be downloaded automatically: first put "
             f"ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar in "
             f"{shown}/downloads/manual/")
  return hint + ". Or set --config.dataset.data_dir to where it is already prepared."


def _tfds_split(name: str, split: str, data_dir: str | None) -> Any:
  # Imported lazily: tensorflow_datasets takes ~1 s to import.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # download=False: an unprepared dataset must fail fast with our hint rather
  # than start a multi-hour download (or an ImageNet build that cannot work).
  return tfds.data_source(name, split=split, data_dir=data_dir, download=False)


def _open_tfds(ds_cfg: Any) -> tuple[Any, Any]:
  """Opens the train and eval splits, translating tfds errors."""
  name = tfds_name(cfg_get(ds_cfg, "name"))
  data_dir = cfg_get(ds_cfg, "data_dir") or None
  shown = data_dir or f"the default TFDS data_dir ({_default_data_dir()})"
  try:
    train = _tfds_split(name, train_split_name(ds_cfg), data_dir)
  except Exception as e:  # pylint: disable=broad-except
    # tfds raises assorted types here (a "not implemented" error for a missing or
    # TFRecord-format dataset, AssertionError, FileNotFoundError, ...).
    # The hint comes first: tfds' own text (e.g. about TFRECORD files) is
    # confusing for a dataset that was simply never built.
    raise ValueError(f"{name} is not prepared in {shown}. "
                     + _tfds_prepare_hint(name, data_dir)
                     + f" (tfds said: {type(e).__name__}: {str(e)[:300]})"
                     ) from e
  split = eval_split_name(ds_cfg)
  try:
    test = _tfds_split(name, split, data_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"Split {split!r} of {name} could not be opened in {shown} "
                     f"({type(e).__name__}: {str(e)[:300]}). Set "
                     f"--config.dataset.test_split to an existing split ('test' for "
                     f"cifar, 'validation' for imagenet2012).") from e
  return train, test


def _tfds_info(train: Any, test: Any) -> tuple[int, tuple[Any, ...]]:
  """num_classes and stored image shape from the TFDS feature spec."""
  info = getattr(train, "dataset_info", None)
  if info is not None:
    features = info.features
    return (int(features["label"].num_classes),
            tuple(features["image"].shape))
  # Plain sequences (e.g. tests that monkeypatch tfds.data_source): look at
  # the data itself.
  labels = [int(ex["label"]) for src in (train, test) for ex in src]
  shapes = {to_rgb_uint8(src[0]["image"]).shape for src in (train, test)}
  shape = shapes.pop() if len(shapes) == 1 else (None, None, 3)
  return max(labels) + 1, shape


# ----------------------------------------------------------------------------
# image files (ImageFolder trees, list files)


def _listing(folder: str, limit: int = 8) -> str:
  try:
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
  except OSError:
    return "?"
  more = ", ..." if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _image_folder_indexes(ds_cfg: Any) -> tuple[folders.FileIndex,
                                                folders.FileIndex]:
  """The indexes of the two split folders: ``dataset.train_root`` /
  ``dataset.test_root`` when set (each the folder holding one sub-folder per
  class), else ``dataset.path`` joined with ``train_split`` / ``test_split``."""
  root = cfg_get(ds_cfg, "path")
  indexes = []
  for field, split, root_field in (
      ("train_split", train_split_name(ds_cfg), "train_root"),
      ("test_split", eval_split_name(ds_cfg), "test_root")):
    split_dir = cfg_get(ds_cfg, root_field)
    if split_dir:
      if not os.path.isdir(split_dir):
        raise ValueError(f"dataset.{root_field}={split_dir!r} does not exist or is "
                         f"not a directory; set --config.dataset.{root_field} to the "
                         f"folder holding one sub-folder per class.")
      indexes.append(folders.index_image_folder(split_dir))
      continue
    if not root:
      raise ValueError(f"--config.dataset.name=imagefolder needs --config.dataset.path, the folder "
                       f"holding train/<class>/*.JPEG and val/<class>/*.JPEG; pass "
                       f"--config.dataset.path=/data/imagenet (or name each split "
                       f"folder: --config.dataset.train_root=/data/imagenet/train "
                       f"--config.dataset.test_root=/data/imagenet/val; "
                       f"dataset.{root_field} is empty).")
    if not os.path.isdir(root):
      raise ValueError(f"dataset.path={root!r} does not exist or is not a "
                       f"directory; set --config.dataset.path to the folder "
                       f"holding the train/ and val/ image folders.")
    if not os.access(root, os.R_OK | os.X_OK):
      raise ValueError(f"dataset.path={root!r} is not readable by this user; fix "
                       f"its permissions.")
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      raise ValueError(f"{root!r} has no {split!r} folder (it holds: "
                       f"{_listing(root)}). dataset.path must be the folder "
                       f"holding the split folders (not a split folder); set "
                       f"--config.dataset.{field} to the name of the split "
                       f"folder with one sub-folder per class.")
    indexes.append(folders.index_image_folder(split_dir))
  train, test = indexes
  if train.classes != test.classes:
    only_train = sorted(set(train.classes) - set(test.classes))[:5]
    only_test = sorted(set(test.classes) - set(train.classes))[:5]
    raise ValueError(f"The class folders of {train.root!r} and {test.root!r} "
                     f"differ ({len(train.classes)} vs {len(test.classes)}; "
                     f"only in train: {only_train}, only in eval: {only_test}),"
                     f" so their class ids would not agree. Give both splits "
                     f"the same class folders.")
  return train, test


def _file_list_indexes(ds_cfg: Any) -> tuple[folders.FileIndex,
                                             folders.FileIndex]:
  path = cfg_get(ds_cfg, "path") or ""
  indexes = []
  for split in ("train", "test"):
    list_path = cfg_get(ds_cfg, f"{split}_list")
    root = cfg_get(ds_cfg, f"{split}_root") or path
    if not list_path or not root:
      raise ValueError(f"--config.dataset.name=filelist needs --config.dataset.{split}_list (a "
                       f"file of 'relative/path label' lines) and an image "
                       f"root for its paths (dataset.{split}_root, or "
                       f"dataset.path for both splits); got {split}_list="
                       f"{list_path!r}, root={root!r}.")
    indexes.append(folders.index_file_list(root, list_path))
  train, test = indexes
  top_train, top_test = int(train.labels.max()), int(test.labels.max())
  if top_test > top_train:
    raise ValueError(f"{cfg_get(ds_cfg, 'test_list')!r} has label {top_test} "
                     f"but the labels of {cfg_get(ds_cfg, 'train_list')!r} "
                     f"stop at {top_train}: the model would never train that "
                     f"class. Check that both lists number the classes the "
                     f"same way (0..C-1).")
  return train, test


def _file_list_class_ids(ds_cfg: Any) -> ClassIds:
  train, test = _file_list_indexes(ds_cfg)
  ids, counts = np.unique(np.concatenate([train.labels, test.labels]),
                          return_counts=True)
  return ClassIds(ids, counts, f"The list files {cfg_get(ds_cfg, 'train_list')!r} and "
                  f"{cfg_get(ds_cfg, 'test_list')!r}")


# ----------------------------------------------------------------------------
# the table of sources


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """How one ``ds_cfg.name`` is read and what it supports (a row of :data:`SOURCES`).

  Attributes:
    open: ``ds_cfg -> (train, test)`` random-access sources.
    inspect: ``ds_cfg -> SourceInfo``, reading no pixels where the format allows.
    in_memory: the sources are :class:`ArraySource` (the whole split in host memory,
      so ``dataset.cache_on_device`` works); otherwise images are read from files.
    num_classes: the class count the name fixes (None: read from the data).
    test_split: the evaluation split when ``ds_cfg.test_split`` is empty.
    class_ids: ``ds_cfg -> ClassIds`` where the class count is the largest label + 1
      (npz, list files), checked by :func:`derived_num_classes`; None where the name,
      the class folders or the dataset's metadata give it.
    files: the sources are :class:`folders.FileSource` (image files, whose sizes
      ``inspect`` does not read: ``stored_shape`` is ``(None, None, 3)``).
  """
  open: Callable[[Any], tuple[Any, Any]]
  inspect: Callable[[Any], SourceInfo]
  in_memory: bool
  num_classes: int | None = None
  test_split: str = "test"
  class_ids: Callable[[Any], ClassIds] | None = None
  files: bool = False


Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _open_arrays(load: Callable[[Any], Arrays], ds_cfg: Any) -> tuple[Any, Any]:
  x_train, y_train, x_test, y_test = load(ds_cfg)
  return ArraySource(x_train, y_train), ArraySource(x_test, y_test)


def _inspect_arrays(load: Callable[[Any], Arrays], num_classes: int,
                    ds_cfg: Any) -> SourceInfo:
  x_train, _, x_test, _ = load(ds_cfg)
  return SourceInfo(len(x_train), len(x_test), num_classes, tuple(x_train.shape[1:]))


def _in_memory(load: Callable[[Any], Arrays], num_classes: int) -> SourceSpec:
  """A source of whole arrays ``load(ds_cfg) = (x_train, y_train, x_test, y_test)``."""
  return SourceSpec(functools.partial(_open_arrays, load),
                    functools.partial(_inspect_arrays, load, num_classes),
                    in_memory=True, num_classes=num_classes)


def _digits_arrays(ds_cfg: Any) -> Arrays:
  del ds_cfg  # nothing to configure
  return load_digits_arrays()


def _cifar_arrays(ds_cfg: Any) -> Arrays:
  return cifar.load_cifar(cfg_get(ds_cfg, "name"), cfg_get(ds_cfg, "data_dir"))


def _npz_arrays_of(ds_cfg: Any) -> Arrays:
  path = cfg_get(ds_cfg, "path")
  _check_npz(path)
  return _load_npz_arrays(path)


def _npz_class_ids(ds_cfg: Any) -> ClassIds:
  return _check_npz(cfg_get(ds_cfg, "path"))[2]


def _inspect_npz(ds_cfg: Any) -> SourceInfo:
  headers, num_classes, _ = _check_npz(cfg_get(ds_cfg, "path"))
  xs, xt = headers["x_train"][0], headers["x_test"][0]
  return SourceInfo(xs[0], xt[0], num_classes, (xs[1], xs[2], 3))


IndexFn = Callable[[Any], tuple[folders.FileIndex, folders.FileIndex]]


def _open_files(index: IndexFn, ds_cfg: Any) -> tuple[Any, Any]:
  train, test = index(ds_cfg)
  return folders.FileSource(train), folders.FileSource(test)


def _inspect_files(index: IndexFn, ds_cfg: Any) -> SourceInfo:
  train, test = index(ds_cfg)
  num_classes = int(max(train.labels.max(), test.labels.max())) + 1
  return SourceInfo(len(train), len(test), num_classes, (None, None, 3))


def _files(index: IndexFn, test_split: str = "test",
           class_ids: Callable[[Any], ClassIds] | None = None) -> SourceSpec:
  """Image files named by ``index(ds_cfg) = (train index, test index)``."""
  return SourceSpec(functools.partial(_open_files, index),
                    functools.partial(_inspect_files, index), in_memory=False,
                    test_split=test_split, class_ids=class_ids, files=True)


def _open_tfds_sources(ds_cfg: Any) -> tuple[Any, Any]:
  train, test = _open_tfds(ds_cfg)
  return TfdsSource(train), TfdsSource(test)


def _inspect_tfds(ds_cfg: Any) -> SourceInfo:
  train, test = _open_tfds(ds_cfg)
  num_classes, shape = _tfds_info(train, test)
  return SourceInfo(len(train), len(test), num_classes, shape)


def _tfds(num_classes: int | None = None, test_split: str = "test") -> SourceSpec:
  return SourceSpec(_open_tfds_sources, _inspect_tfds, in_memory=False,
                    num_classes=num_classes, test_split=test_split)


# Every source, by ds_cfg.name. ImageNet has no labelled "test" split in TFDS, and
# ImageFolder trees call theirs "val". Any other "tfds:NAME" reads like the TFDS rows,
# its classes from the dataset's metadata.
SOURCES: dict[str, SourceSpec] = {
    "cifar10": _in_memory(_cifar_arrays, cifar.ARCHIVES["cifar10"].num_classes),
    "cifar100": _in_memory(_cifar_arrays, cifar.ARCHIVES["cifar100"].num_classes),
    "imagefolder": _files(_image_folder_indexes, test_split="val"),
    "filelist": _files(_file_list_indexes, class_ids=_file_list_class_ids),
    "npz": SourceSpec(functools.partial(_open_arrays, _npz_arrays_of), _inspect_npz,
                      in_memory=True, class_ids=_npz_class_ids),
    "digits": _in_memory(_digits_arrays, 10),
    "tfds:cifar10": _tfds(10),
    "tfds:cifar100": _tfds(100),
    "tfds:imagenet2012": _tfds(1000, test_split="validation"),
}
ALIASES = {"imagenet2012": "tfds:imagenet2012"}
DATASETS = tuple(SOURCES)


def source_spec(name: str) -> SourceSpec:
  """The :data:`SOURCES` row of ``ds_cfg.name`` (an alias or any ``tfds:NAME`` too);
  ``ValueError`` naming the choices for an unknown name."""
  name = ALIASES.get(name, name)
  if name in SOURCES:
    return SOURCES[name]
  if tfds_name(name):
    return _tfds()
  raise ValueError(f"Unknown dataset --config.dataset.name={name!r}. Set it to one of "
                   f"{list(DATASETS)} (or 'tfds:NAME' for another TFDS "
                   f"dataset with 'image' and 'label' features).")


# ----------------------------------------------------------------------------
# public entry points


def inspect_sources(ds_cfg: Any) -> SourceInfo:
  """Validates ``ds_cfg`` and returns sizes/classes/shape without decoding.

  Indexes (and caches) image folders and list files; reads the CIFAR archive
  (downloading it when missing).

  Raises:
    ValueError: unknown name, bad or missing npz, tfds dataset not prepared,
      bad image tree or list file, missing CIFAR archive without network.
  """
  return source_spec(cfg_get(ds_cfg, "name")).inspect(ds_cfg)


def derived_num_classes(ds_cfg: Any) -> int | None:
  """The class count ``config.model.num_classes=-1`` takes from the labels (npz, list
  files: the largest + 1), or None where the name, the class folders or the dataset's
  metadata fix it (nothing is read then).

  Raises:
    ValueError: as :func:`inspect_sources`; or most of those classes would have no
      example (:func:`check_class_ids`), naming the labels and the fix.
  """
  spec = source_spec(cfg_get(ds_cfg, "name"))
  if spec.class_ids is None:
    return None
  return check_class_ids(spec.class_ids(ds_cfg))


def get_sources(ds_cfg: Any) -> tuple[Any, Any]:
  """``(train_source, test_source)``: random-access, see the module docstring.

  Image files are :class:`folders.FileSource` (decoded at full size by
  ``source[i]``; ``source.read(i)`` gives the encoded bytes).

  Raises:
    ValueError: as :func:`inspect_sources`.
  """
  return source_spec(cfg_get(ds_cfg, "name")).open(ds_cfg)
