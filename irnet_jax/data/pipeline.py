"""Deterministic, resumable, process-sharded grain input pipelines.

Training (:func:`train_dataset`) is a random-access ``grain.MapDataset`` of
*steps*: element ``s`` is this process's share of the global batch of step
``s``. It is built from one global *stream* of examples:

  position p = 0, 1, 2, ...  ->  epoch e = p // N, slot i = p % N
  example(p) = source[perm(seed, e)[i]]          (fresh permutation per epoch)
  image(p)   = augment(example(p).image, rng(seed, p))

The global batch of step ``s`` is positions ``[s G, (s + 1) G)`` (``G`` the
global batch size), and process ``k`` of ``n`` gets the ``k``-th of its ``n``
contiguous chunks. Nothing depends on the number of processes, worker
processes or threads, or on ``num_steps``, so

* the concatenation of the local batches over processes is bitwise the
  single-process batch (augmentation included);
* resuming at step ``k`` is ``train_ds[k:]``;
* batches may straddle epochs; nothing is dropped except the unused tail.

Speed: :func:`train_iterator` builds batches in grain worker processes
(``dataset.num_workers``; by default only for the "imagenet" recipe on images
larger than :data:`SMALL_IMAGE_SIDE`), each decoding and augmenting whole batches
(image files are cropped from their header size before decoding, optionally at a
reduced JPEG scale: ``dataset.jpeg_draft``). Its :class:`BatchIterator` joins the
workers and frees their shared memory after the last batch, on ``close()``, or at
exit. Batches stay uint8 NHWC up to the
device; normalization, and by default the colour jitter, run inside the
jitted step (:mod:`irnet_jax.data.device`).

Evaluation (:func:`eval_batches`) covers every test example exactly once, in
order, padding the last global batch with ``mask=False`` entries.
"""
from __future__ import annotations

import atexit
import dataclasses
import gc
import logging
import math
import os
import sys
import threading
import weakref
from typing import Any, Iterator, NamedTuple

import grain
import numpy as np
from absl import flags

from irnet_jax.data import augment as augment_lib
from irnet_jax.data import decode, decode_crop, sources

log = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

# Tags that separate the seed streams derived from the user's seed.
_SHUFFLE_TAG = 0x5F1
_AUGMENT_TAG = 0xA06

JITTER_PLACES = ("device", "host")
# Stored images up to this side (pixels) decode in ~0.1-0.2 ms (a 64x64 PNG or
# JPEG on one core of a Xeon): dataset.num_workers=-1 reads them in-process.
SMALL_IMAGE_SIDE = 64
# Undecodable files replaced in a row before giving up (skip_bad_files).
_MAX_REPLACEMENTS = 100


class DatasetInfo(NamedTuple):
  """Static facts about a configured dataset.

  Attributes:
    num_train: examples in the training split.
    num_test: examples in the evaluation split.
    num_classes: number of classes (labels are ``0..num_classes-1``).
    image_shape: ``(H, W, 3)`` of the model input, i.e. after augmentation /
      eval crop: ``(image_size, image_size, 3)``.
  """
  num_train: int
  num_test: int
  num_classes: int
  image_shape: tuple[int, int, int]


# ----------------------------------------------------------------------------
# validation


def _check_cfg(ds_cfg: Any) -> tuple[sources.SourceInfo, str, int]:
  """Cheap checks first, then the source inspection; returns what it learnt."""
  name = sources.cfg_get(ds_cfg, "name")
  spec = sources.source_spec(name)  # an unknown name first
  augment = sources.cfg_get(ds_cfg, "augment", "none")
  if augment not in augment_lib.AUGMENTS:
    raise ValueError(f"Unknown --config.dataset.augment={augment!r}. Set it to one of "
                     f"{list(augment_lib.AUGMENTS)}.")
  size = sources.cfg_get(ds_cfg, "image_size")
  if not isinstance(size, (int, np.integer)) or size <= 0:
    raise ValueError(f"--config.dataset.image_size={size!r} must be a positive int (32 "
                     f"for CIFAR, 224 for ImageNet, 16 for digits).")
  for field in ("mean", "std"):
    value = sources.cfg_get(ds_cfg, field)
    if value is None or np.shape(value) != (3,):
      raise ValueError(f"ds_cfg.{field}={value!r} must be 3 per-channel (RGB) "
                       f"values in [0, 1] units.")
  if np.any(np.asarray(sources.cfg_get(ds_cfg, "std")) <= 0):
    raise ValueError(f"--config.dataset.std={sources.cfg_get(ds_cfg, 'std')!r} must be "
                     f"positive.")
  color_jitter_on(ds_cfg)  # Validates ds_cfg.color_jitter_on,
  _prefetch_megabytes(ds_cfg)  # ... and prefetch_mb.
  info = spec.inspect(ds_cfg)
  h, w = info.stored_shape[:2]
  if augment != "imagenet" and spec.files:
    # Image files: inspect reads no sizes; their headers tell (a sample of them,
    # and each image again when decoded: _check_stored_size).
    _check_file_sizes(ds_cfg, name, augment, int(size))
  elif augment != "imagenet":
    if h is None or w is None:
      raise ValueError(f"{name} images vary in size, which --config.dataset."
                       f"augment={augment} cannot handle. Set --config.dataset."
                       f"augment=imagenet (random-resized-crop for training, "
                       f"resize + centre crop for evaluation).")
    if (h, w) != (size, size):
      raise ValueError(f"{name} images are {h}x{w} but --config.dataset.image_size={size} "
                       f"and augment={augment!r} does not resize. Set "
                       f"--config.dataset.image_size={h} (square images) or "
                       f"--config.dataset.augment=imagenet.")
  return info, augment, int(size)


def _resize_fix(augment: str) -> str:
  return (f"--config.dataset.augment={augment} uses each stored image as it is "
          f"(no resize)")


def _check_file_sizes(ds_cfg: Any, name: str, augment: str, size: int) -> None:
  """Image files with a recipe that does not resize ("cifar", "shift", "none"):
  the sampled files (:meth:`folders.FileIndex.sample_sizes`, both splits) must all
  be ``size`` x ``size``."""
  train, test = sources.get_sources(ds_cfg)
  first: dict[tuple[int, int], str] = {}
  for hw, path in train.index.sample_sizes() + test.index.sample_sizes():
    first.setdefault(hw, path)
  if len(first) > 1:
    shown = "; ".join(f"{path} is {h}x{w}"
                      for (h, w), path in list(first.items())[:3])
    raise ValueError(f"The {name} images vary in size ({shown}), but "
                     f"{_resize_fix(augment)}, so every image must be "
                     f"{size}x{size} (--config.dataset.image_size={size}). Resize "
                     f"the files to one size, or set --config.dataset.augment="
                     f"imagenet (random-resized crop for training, resize + centre "
                     f"crop for evaluation).")
  for (h, w), path in first.items():
    if (h, w) != (size, size):
      fix = (f"set --config.dataset.image_size={h}" if h == w else
             f"resize the files to {size}x{size}")
      raise ValueError(f"The {name} images are {h}x{w} (e.g. {path}) but "
                       f"--config.dataset.image_size={size}, and "
                       f"{_resize_fix(augment)}: {fix}, or set "
                       f"--config.dataset.augment=imagenet (crops and resizes to "
                       f"image_size).")


def _check_stored_size(image: np.ndarray, path: str, size: int,
                       augment: str) -> np.ndarray:
  """A decoded file for a recipe that does not resize must be ``size`` square."""
  if image.shape[:2] != (size, size):
    raise ValueError(f"{path} is {image.shape[0]}x{image.shape[1]}, but "
                     f"{_resize_fix(augment)} and the model input is {size}x{size} "
                     f"(--config.dataset.image_size={size}; the files sampled "
                     f"when the run started were). Resize or remove the file, or "
                     f"set --config.dataset.augment=imagenet.")
  return image


def _check_sharding(global_batch_size: int, process_index: int,
                    process_count: int) -> int:
  """Returns the per-process batch size."""
  if global_batch_size <= 0:
    raise ValueError(f"global_batch_size={global_batch_size} must be positive.")
  if process_count <= 0 or not 0 <= process_index < process_count:
    raise ValueError(f"Need 0 <= process_index ({process_index}) < "
                     f"process_count ({process_count}).")
  if global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} is not divisible "
                     f"by process_count={process_count}; pick a multiple of "
                     f"{process_count}.")
  return global_batch_size // process_count


def dataset_info(ds_cfg: Any) -> DatasetInfo:
  """Validates ``ds_cfg`` and returns sizes, classes and model input shape.

  Cheap: reads no images (npz headers and labels only; tfds metadata only).

  Raises:
    ValueError: naming the problem and the fix, for an unknown ``name`` or
      ``augment``, a missing/malformed npz, an unprepared tfds dataset, or an
      ``image_size`` that does not fit the stored images.
  """
  info, _, size = _check_cfg(ds_cfg)
  return DatasetInfo(num_train=int(info.num_train),
                     num_test=int(info.num_test),
                     num_classes=int(info.num_classes),
                     image_shape=(size, size, 3))


# ----------------------------------------------------------------------------
# picklable per-element functions (grain may run them in threads or processes)


class _EpochShuffle:
  """Maps a stream position to a source index: a fresh permutation per epoch.

  ``perm(e) = default_rng([seed, TAG, e]).permutation(N)``; the last two
  epochs' permutations are cached (an ImageNet one is 10 MB and ~30 ms).
  """

  def __init__(self, num_examples: int, seed: int):
    self.num_examples = num_examples
    self.seed = seed
    self._cache: dict[int, np.ndarray] = {}
    self._lock = threading.Lock()

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      perm = self._cache.get(epoch)
    if perm is None:
      rng = np.random.default_rng([self.seed, _SHUFFLE_TAG, epoch])
      perm = rng.permutation(self.num_examples)
      with self._lock:
        self._cache[epoch] = perm
        for old in sorted(self._cache)[:-2]:
          del self._cache[old]
    return perm

  def __call__(self, position: int) -> int:
    epoch, slot = divmod(int(position), self.num_examples)
    return int(self.permutation(epoch)[slot])

  def __getstate__(self) -> dict[str, Any]:
    return {"num_examples": self.num_examples, "seed": self.seed}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["num_examples"], state["seed"])


def _example_rng(seed: int, position: int) -> np.random.Generator:
  """The augmentation generator of stream position ``position``."""
  return np.random.default_rng([seed, _AUGMENT_TAG, position])


# eq=False, repr=False: object identity and the plain repr, because grain names
# a map function by its repr and a field-wise one would walk the whole source.
@dataclasses.dataclass(eq=False, repr=False)
class _TrainExample:
  """``position -> dict(image=uint8 (size, size, 3), label, bad)``: shuffle,
  read, decode, augment; a pure function of ``(seed, position)``.

  A file source (one with ``read(i) -> bytes``) is decoded here, so the
  "imagenet" recipe can crop before decoding (:mod:`decode_crop`).
  With ``skip_bad_files`` an undecodable file is replaced by the next example
  of the epoch's permutation (then the next, ...) and flagged ``bad=1``.
  """

  source: Any
  shuffle: _EpochShuffle
  seed: int
  augment: str
  size: int
  jitter: bool
  draft: bool
  skip_bad_files: bool
  transform: augment_lib.TrainTransform = dataclasses.field(init=False)

  def __post_init__(self) -> None:
    # Only the "imagenet" recipe has a colour jitter; the transform leaves it
    # to __call__ (or to the device), after the crop.
    self.jitter = self.jitter and self.augment == "imagenet"
    self.transform = augment_lib.train_transform(self.augment, self.size,
                                                 jitter=False)

  def _load(self, index: int, rng: np.random.Generator
            ) -> tuple[np.ndarray, int]:
    """Augmented uint8 image (before the colour jitter) and label."""
    if not hasattr(self.source, "read"):
      example = self.source[index]
      return self.transform(example["image"], rng), example["label"]
    path = self.source.path(index)
    data = self.source.read(index)
    if self.augment == "imagenet":
      image = decode_crop.random_resized_crop(data, path, rng, self.size,
                                              self.draft)
      image = augment_lib.random_flip(image, rng)
    else:
      image = _check_stored_size(decode.decode_image(data, path), path,
                                 self.size, self.augment)
      image = self.transform(image, rng)
    return image, self.source.label(index)

  def __call__(self, position: int) -> dict[str, Any]:
    rng = _example_rng(self.seed, position)
    bad = 0
    for attempt in range(_MAX_REPLACEMENTS):
      try:
        image, label = self._load(self.shuffle(position + attempt), rng)
        break
      except decode.BadImageError as e:
        if not self.skip_bad_files:
          raise
        bad = 1
        log.warning("Skipping bad image %s (%s): replaced by the next example "
                    "of the epoch (dataset.skip_bad_files=True).", e.path,
                    e.reason)
    else:
      raise ValueError(f"{_MAX_REPLACEMENTS} consecutive images from stream "
                       f"position {position} on could not be decoded: the "
                       f"data is mostly unreadable. Check the files.")
    if self.jitter:
      image = augment_lib.color_jitter(image, rng)
    return {"image": image, "label": int(label), "bad": bad}


class _Stack:
  """Stacks examples into a uint8 NHWC batch (normalization happens on the
  device, :mod:`irnet_jax.data.device`)."""

  def __init__(self, count_bad: bool):
    self.count_bad = count_bad

  def __call__(self, examples: list[dict[str, Any]]) -> Batch:
    batch = {"image": np.stack([ex["image"] for ex in examples]),
             "label": np.asarray([ex["label"] for ex in examples], np.int32)}
    if self.count_bad:
      batch["bad_files"] = np.asarray([ex["bad"] for ex in examples], np.int32)
    return batch


# ----------------------------------------------------------------------------
# options


def color_jitter_on(ds_cfg: Any) -> str | None:
  """Where the "imagenet" recipe's colour jitter runs: ``"device"`` (in the
  jitted step, :mod:`irnet_jax.data.device`) or ``"host"`` (in the workers);
  ``None`` for the other recipes, which have none."""
  where = sources.cfg_get(ds_cfg, "color_jitter_on", "device") or "device"
  if where not in JITTER_PLACES:
    raise ValueError(f"--config.dataset.color_jitter_on={where!r}; set it to one of "
                     f"{list(JITTER_PLACES)}.")
  if sources.cfg_get(ds_cfg, "augment", "none") != "imagenet":
    return None
  return where


def usable_cpus() -> int:
  """CPUs this process may run on (its affinity mask, not the machine's)."""
  return len(os.sched_getaffinity(0))


def _prefetch_megabytes(ds_cfg: Any) -> float:
  """``ds_cfg.prefetch_mb`` (default 1024), checked."""
  megabytes = sources.cfg_get(ds_cfg, "prefetch_mb", 1024)
  megabytes = 1024 if megabytes is None else megabytes
  if megabytes <= 0:
    raise ValueError(f"--config.dataset.prefetch_mb={megabytes} must be positive.")
  return megabytes


def _stored_side(ds_cfg: Any) -> float | None:
  """The longer side of the stored images in pixels (image files: the median of
  32 sampled headers), or None where they vary or are unknown (TFDS ImageNet)."""
  spec = sources.source_spec(sources.cfg_get(ds_cfg, "name"))
  if spec.files:
    train, _ = sources.get_sources(ds_cfg)
    sides = [max(hw) for hw, _ in train.index.sample_sizes(32)]
    return float(np.median(sides)) if sides else None
  h, w = spec.inspect(ds_cfg).stored_shape[:2]
  return None if h is None or w is None else float(max(h, w))


def loader_options(ds_cfg: Any, local_batch_size: int) -> dict[str, int]:
  """Keyword arguments of :func:`train_iterator` from the config.

  * ``num_workers``: ``ds_cfg.num_workers``; ``-1`` (default) means every
    usable CPU for the "imagenet" recipe on images larger than
    :data:`SMALL_IMAGE_SIDE` (JPEG decoding, resizing), else 0 (in-process
    threads): the small-image recipes, and any recipe on small images, cost
    ~0.1 ms an image, less than starting worker processes (~1-3 s a pool, one
    per training and one per evaluation; docs/data.md, "Input pipeline").
  * ``num_threads``: ``ds_cfg.num_threads`` (in-process readers).
  * ``prefetch_batches``: ``ds_cfg.prefetch_mb`` (default 1024) of uint8
    batches of ``local_batch_size`` images, at least one per worker.
  """
  workers = sources.cfg_get(ds_cfg, "num_workers", -1)
  workers = -1 if workers is None else int(workers)
  if workers < 0:
    imagenet = sources.cfg_get(ds_cfg, "augment", "none") == "imagenet"
    side = _stored_side(ds_cfg) if imagenet else None
    large = side is None or side > SMALL_IMAGE_SIDE
    workers = usable_cpus() if imagenet and large else 0
  size = int(sources.cfg_get(ds_cfg, "image_size"))
  batch_bytes = local_batch_size * size * size * 3
  megabytes = _prefetch_megabytes(ds_cfg)
  prefetch = max(1, workers, int(megabytes * 2**20 // batch_bytes))
  threads = int(sources.cfg_get(ds_cfg, "num_threads", 2) or 0)
  return dict(num_workers=workers, num_threads=threads,
              prefetch_batches=prefetch)


# ----------------------------------------------------------------------------
# training


def train_dataset(ds_cfg: Any, global_batch_size: int, seed: int,
                  num_steps: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
  """Random-access dataset of this process's training batches, one per step.

  Args:
    ds_cfg: dataset config (see ``irnet_jax.data``).
    global_batch_size: examples per step over all processes.
    seed: non-negative int; determines the shuffle and the augmentation.
    num_steps: number of training steps; ``len(result) == num_steps``.
    process_index, process_count: this process and the number of processes.

  Returns:
    ``grain.MapDataset`` whose element ``s`` is ``dict(image=uint8
    (B, H, W, 3) NHWC in [0, 255], label=int32 (B,))`` with
    ``B = global_batch_size // process_count``, plus ``bad_files=int32 (B,)``
    (1 where an undecodable file was replaced) when ``ds_cfg.skip_bad_files``.
    Normalization (and, by default, the colour jitter) happen on the device:
    :func:`irnet_jax.data.device.model_input`. See the module docstring for
    the determinism and sharding guarantees.

  Raises:
    ValueError: bad config (see :func:`dataset_info`) or batch not divisible.
  """
  local_batch = _check_sharding(global_batch_size, process_index,
                                process_count)
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r} must be a non-negative int.")
  if num_steps < 0:
    raise ValueError(f"num_steps={num_steps} must be >= 0.")
  _, augment, size = _check_cfg(ds_cfg)
  jitter = color_jitter_on(ds_cfg) == "host"
  train_source, _ = sources.get_sources(ds_cfg)
  skip = bool(sources.cfg_get(ds_cfg, "skip_bad_files", False))
  example = _TrainExample(
      train_source, _EpochShuffle(len(train_source), int(seed)), int(seed),
      augment, size, jitter=jitter,
      draft=bool(sources.cfg_get(ds_cfg, "jpeg_draft", True)),
      skip_bad_files=skip)
  stream = grain.MapDataset.range(num_steps * global_batch_size).map(example)
  # Local batch j holds positions [j B, (j + 1) B); global step s is local
  # batches s n .. s n + n - 1, so process k takes every n-th from k. The
  # stream length is a multiple of B: drop_remainder never drops anything.
  batches = stream.batch(local_batch, drop_remainder=True,
                         batch_fn=_Stack(count_bad=skip))
  return batches[process_index::process_count]


# Iterators with worker processes still open; closed at exit (_close_at_exit).
_OPEN: weakref.WeakSet = weakref.WeakSet()


def _flush_shared_memory() -> None:
  """Unlinks the shared memory of batches that are no longer referenced.

  Workers hand batches over in shared memory blocks; a block is unlinked when its
  last array is deleted, by grain's deleter thread (``SharedMemoryArray``'s async
  delete). Some of those arrays sit in reference cycles inside grain's iterators, so
  after a close they wait for the garbage collector, and a deletion still queued when
  Python exits never runs: the resource tracker then warns of "leaked shared_memory
  objects" (and unlinks them). Collect, then wait for the deleter's queue (one thread,
  first in first out).
  """
  gc.collect()
  if sys.is_finalizing():
    return  # The deleter thread may be gone: do not wait for it.
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top
    pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:
      pool.apply_async(int).wait(timeout=10)
  except Exception as e:  # pylint: disable=broad-except
    # grain's internals moved, or the pool is shut down: at worst the warning.
    log.debug("Could not flush grain's shared memory deletions: %s", e)


class BatchIterator:
  """Batches from :func:`train_iterator`; releases its worker processes and their
  shared memory when the last batch has been taken, on :meth:`close` (or leaving a
  ``with`` block, or garbage collection), and at the latest when Python exits."""

  def __init__(self, iterator: Iterator[Batch], remaining: int, workers: bool):
    self._iterator: Iterator[Batch] | None = iterator
    self._remaining = remaining
    self._workers = workers
    if workers:
      _OPEN.add(self)

  def __iter__(self) -> "BatchIterator":
    return self

  def __next__(self) -> Batch:
    if self._iterator is None or self._remaining <= 0:
      self.close()
      raise StopIteration
    try:
      batch = next(self._iterator)
    except BaseException:
      self.close()
      raise
    self._remaining -= 1
    if self._remaining == 0:
      self.close()  # The workers are done: join them now, not at exit.
    return batch

  def close(self) -> None:
    """Stops and joins the worker processes (if any) and frees their shared memory.
    Idempotent; the batches already taken stay valid."""
    iterator, self._iterator = self._iterator, None
    if iterator is None:
      return
    _OPEN.discard(self)
    close = getattr(iterator, "close", None)
    if close is not None:
      close()
    del iterator, close
    if self._workers:
      _flush_shared_memory()

  def __enter__(self) -> "BatchIterator":
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self.close()

  def __del__(self) -> None:
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass  # Interpreter shutdown; _close_at_exit has run.


@atexit.register
def _close_at_exit() -> None:
  """Closes the iterators left open (an interrupted run, an iterator not read to its
  end) before multiprocessing's own exit handler (registered earlier, so run later)
  terminates the workers; then frees the batches still held.

  After an uncaught exception (Ctrl-C, a crash) the interpreter keeps it in
  ``sys.last_*`` until it is torn down, and with it every frame of the traceback and
  the batches they hold, whose shared memory would then never be unlinked. Nothing
  reads those records once the exit handlers run (it is how post-mortem debuggers
  find the exception, in a session that goes on), so they are dropped first.
  """
  for name in ("last_exc", "last_type", "last_value", "last_traceback"):
    if getattr(sys, name, None) is not None:
      setattr(sys, name, None)
  for iterator in list(_OPEN):
    try:
      iterator.close()
    except Exception as e:  # pylint: disable=broad-except
      log.debug("Closing a batch iterator at exit: %s", e)
  _flush_shared_memory()


def train_iterator(train_ds: grain.MapDataset, start_step: int = 0,
                   num_threads: int = 2, *, num_workers: int = 0,
                   prefetch_batches: int | None = None) -> BatchIterator:
  """Iterates batches ``start_step, start_step + 1, ...`` with prefetching.

  The batches are the same whatever the worker and thread counts.

  Args:
    train_ds: from :func:`train_dataset` (or any MapDataset of batches).
    start_step: first step to yield (``0 <= start_step <= len(train_ds)``).
    num_threads: with ``num_workers=0``: grain reader threads in this
      process, each building whole batches; 0 reads synchronously.
    num_workers: worker processes (grain ``mp_prefetch``), worker ``i``
      building batches ``i, i + W, ...``; an error in a worker (e.g. a bad
      file) is raised here with its traceback.
    prefetch_batches: batches buffered ahead over all readers (default two
      per reader; at least one per worker); see :func:`loader_options`.

  Returns:
    A :class:`BatchIterator` over batch dicts (see :func:`train_dataset`): the
    workers are joined and their shared memory freed once the last batch is
    taken, or on ``close()`` / leaving ``with``, or at exit.
  """
  if not 0 <= start_step <= len(train_ds):
    raise ValueError(f"start_step={start_step} is outside [0, "
                     f"{len(train_ds)}].")
  ds = train_ds[start_step:]
  if num_workers > 0:
    buffers = prefetch_batches or 2 * num_workers
    # Each worker reads synchronously; its output queue holds the buffers.
    options = grain.MultiprocessingOptions(
        num_workers=num_workers,
        per_worker_buffer_size=max(1, buffers // num_workers))
    serial = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    if not flags.FLAGS.is_parsed():
      # grain reads an absl flag when it starts workers, which raises outside
      # absl.app (scripts, pytest): google/grain#1355. Use the defaults.
      flags.FLAGS.mark_as_parsed()
    return BatchIterator(iter(ds.to_iter_dataset(serial).mp_prefetch(options)),
                         len(ds), workers=True)
  if prefetch_batches is None:
    prefetch_batches = 2 * num_threads
  options = grain.ReadOptions(num_threads=max(0, int(num_threads)),
                              prefetch_buffer_size=max(0, prefetch_batches))
  return BatchIterator(iter(ds.to_iter_dataset(options)), len(ds), workers=False)


# ----------------------------------------------------------------------------
# evaluation


# eq=False, repr=False: object identity and the plain repr, because grain names
# a map function by its repr and a field-wise one would walk the whole source.
@dataclasses.dataclass(eq=False, repr=False)
class _EvalBatch:
  """``step -> local eval batch`` (uint8) with zero padding and a mask.

  With ``skip_bad_files`` an undecodable file is masked out (and logged)
  instead of raising.
  """

  source: Any
  transform: augment_lib.EvalTransform
  global_batch: int
  local_batch: int
  process_index: int
  size: int
  skip_bad_files: bool
  imagenet: bool
  augment: str = "imagenet"

  def _load(self, index: int) -> tuple[np.ndarray, int]:
    if hasattr(self.source, "read"):
      data, path = self.source.read(index), self.source.path(index)
      if self.imagenet:
        image = decode_crop.resize_center_crop(data, path, self.size)
      else:
        image = _check_stored_size(decode.decode_image(data, path), path,
                                   self.size, self.augment)
      return image, self.source.label(index)
    example = self.source[index]
    return self.transform(example["image"]), example["label"]

  def __call__(self, step: int) -> Batch:
    start = step * self.global_batch + self.process_index * self.local_batch
    n = len(self.source)
    images = np.zeros((self.local_batch, self.size, self.size, 3), np.uint8)
    labels = np.zeros(self.local_batch, np.int32)
    mask = np.zeros(self.local_batch, bool)
    for row, index in enumerate(range(start, min(start + self.local_batch, n))):
      try:
        images[row], labels[row] = self._load(index)
      except decode.BadImageError as e:
        if not self.skip_bad_files:
          raise
        log.warning("Skipping bad image %s (%s): left out of the evaluation "
                    "(dataset.skip_bad_files=True).", e.path, e.reason)
        continue
      mask[row] = True
    return {"image": images, "label": labels, "mask": mask}


def eval_dataset(ds_cfg: Any, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """Random-access dataset of this process's evaluation batches.

  Global batch ``s`` holds test examples ``[s G, (s + 1) G)`` in order, split
  into ``process_count`` contiguous chunks; there are ``ceil(num_test / G)``
  steps on every process. Elements are ``dict(image=uint8 (B, H, W, 3),
  label=int32 (B,), mask=bool (B,))``; padding (and, with
  ``skip_bad_files``, undecodable files) has image 0, label 0, mask False.
  """
  local_batch = _check_sharding(global_batch_size, process_index,
                                process_count)
  _, augment, size = _check_cfg(ds_cfg)
  _, test_source = sources.get_sources(ds_cfg)
  num_steps = math.ceil(len(test_source) / global_batch_size)
  make_batch = _EvalBatch(
      test_source, augment_lib.eval_transform(augment, size),
      global_batch_size, local_batch, process_index, size,
      bool(sources.cfg_get(ds_cfg, "skip_bad_files", False)),
      imagenet=augment == "imagenet", augment=augment)
  return grain.MapDataset.range(num_steps).map(make_batch)


def eval_batches(ds_cfg: Any, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """Yields the batches of :func:`eval_dataset`, read as
  :func:`loader_options` says (worker processes for the "imagenet" recipe on
  large images); the workers are joined when the generator ends or is closed."""
  ds = eval_dataset(ds_cfg, global_batch_size, process_index, process_count)
  options = loader_options(ds_cfg, global_batch_size // process_count)
  # Closed however the caller stops (an error, a break): no workers left behind.
  with train_iterator(ds, 0, **options) as batches:
    yield from batches


# ----------------------------------------------------------------------------
# data held on the device (dataset.cache_on_device)


def resident_arrays(ds_cfg: Any) -> dict[str, np.ndarray]:
  """The whole in-memory data set for placing on the device(s) once.

  Returns:
    ``dict(train_image=uint8 (N, H, W, 3) NHWC, train_label=int32 (N,),
    test_image=uint8 (M, H, W, 3), test_label=int32 (M,))``, images at
    ``ds_cfg.image_size``.

  Raises:
    ValueError: the source is not in memory (image files, TFDS), or its images
      are not ``image_size`` square, with the fix.
  """
  _, augment, size = _check_cfg(ds_cfg)
  name = sources.cfg_get(ds_cfg, "name")
  if not sources.source_spec(name).in_memory:
    in_memory = [n for n, spec in sources.SOURCES.items() if spec.in_memory]
    raise ValueError(
        f"dataset.cache_on_device=True needs an in-memory data set ({', '.join(in_memory)}); "
        f"{name!r} is read from files. Set --config.dataset.cache_on_device=False.")
  if augment not in ("cifar", "shift", "none"):
    raise ValueError(f"dataset.cache_on_device=True supports augment cifar, shift or none, "
                     f"not {augment!r}; set --config.dataset.cache_on_device=False.")
  train, test = sources.get_sources(ds_cfg)
  for split, src in (("train", train), ("test", test)):
    if src.images.shape[1:3] != (size, size):
      raise ValueError(f"dataset.cache_on_device=True needs {size}x{size} images (the "
                       f"model input) but the {split} images are "
                       f"{src.images.shape[1]}x{src.images.shape[2]}; set "
                       f"--config.dataset.image_size={src.images.shape[1]}.")
  return dict(train_image=np.ascontiguousarray(train.images, np.uint8),
              train_label=np.asarray(train.labels, np.int32),
              test_image=np.ascontiguousarray(test.images, np.uint8),
              test_label=np.asarray(test.labels, np.int32))


def train_indices(num_examples: int, global_batch_size: int, seed: int,
                  start_step: int, num_steps: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
  """Source rows of training steps ``start_step .. start_step + num_steps - 1``.

  The same examples, in the same order, as :func:`train_dataset`'s batches (one
  shuffle per epoch of the continuous stream of positions), for the data held on
  the device: int32 ``(num_steps, B)`` with ``B = global_batch_size //
  process_count`` this process's share of each global batch.
  """
  local = _check_sharding(global_batch_size, process_index, process_count)
  shuffle = _EpochShuffle(num_examples, int(seed))
  first = start_step * global_batch_size + process_index * local
  starts = first + global_batch_size * np.arange(num_steps)[:, None]
  positions = starts + np.arange(local)[None, :]
  epochs, slots = np.divmod(positions, num_examples)
  out = np.empty(positions.shape, np.int32)
  for epoch in np.unique(epochs):
    where = epochs == epoch
    out[where] = shuffle.permutation(int(epoch))[slots[where]]
  return out
