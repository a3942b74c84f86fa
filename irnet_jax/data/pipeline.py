"""Deterministic, resumable, process-sharded grain input pipelines.

Training (:func:`train_dataset`) is a random-access ``grain.MapDataset`` of
*steps*: element ``s`` is this process's share of the global batch of step
``s``. It is built from one global *stream* of examples:

  position p = 0, 1, 2, ...  ->  epoch e = p // N, slot i = p % N
  example(p) = source[perm(seed, e)[i]]          (fresh permutation per epoch)
  image(p)   = augment(example(p).image, rng(seed, p))

The global batch of step ``s`` is positions ``[s G, (s + 1) G)`` (``G`` the
global batch size), and process ``k`` of ``n`` gets the ``k``-th of its ``n``
contiguous chunks. Nothing depends on the number of processes or on
``num_steps``, so

* the concatenation of the local batches over processes is bitwise the
  single-process batch (augmentation included);
* resuming at step ``k`` is ``train_ds[k:]``;
* batches may straddle epochs; nothing is dropped except the unused tail.

Evaluation (:func:`eval_batches`) covers every test example exactly once, in
order, padding the last global batch with ``mask=False`` entries.
"""
from __future__ import annotations

import math
import threading
from typing import Any, Iterator, NamedTuple

import grain
import numpy as np

from irnet_jax.data import augment as augment_lib
from irnet_jax.data import sources

Batch = dict[str, np.ndarray]

# Tags that separate the seed streams derived from the user's seed.
_SHUFFLE_TAG = 0x5F1
_AUGMENT_TAG = 0xA06


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
  name = sources.check_name(ds_cfg)
  augment = sources.cfg_get(ds_cfg, "augment", "none")
  if augment not in augment_lib.AUGMENTS:
    raise ValueError(f"Unknown ds_cfg.augment={augment!r}. Set it to one of "
                     f"{list(augment_lib.AUGMENTS)}.")
  size = sources.cfg_get(ds_cfg, "image_size")
  if not isinstance(size, (int, np.integer)) or size <= 0:
    raise ValueError(f"ds_cfg.image_size={size!r} must be a positive int (32 "
                     f"for CIFAR, 224 for ImageNet, 16 for digits).")
  for field in ("mean", "std"):
    value = sources.cfg_get(ds_cfg, field)
    if value is None or np.shape(value) != (3,):
      raise ValueError(f"ds_cfg.{field}={value!r} must be 3 per-channel (RGB) "
                       f"values in [0, 1] units.")
  if np.any(np.asarray(sources.cfg_get(ds_cfg, "std")) <= 0):
    raise ValueError(f"ds_cfg.std={sources.cfg_get(ds_cfg, 'std')!r} must be "
                     f"positive.")
  info = sources.inspect_sources(ds_cfg)
  h, w = info.stored_shape[:2]
  if augment != "imagenet":
    if h is None or w is None:
      raise ValueError(f"{name} images vary in size, which augment="
                       f"{augment!r} cannot handle. Set ds_cfg.augment="
                       f"'imagenet' (random-resized-crop for training, resize + "
                       f"centre crop for evaluation).")
    if (h, w) != (size, size):
      raise ValueError(f"{name} images are {h}x{w} but ds_cfg.image_size={size} "
                       f"and augment={augment!r} does not resize. Set "
                       f"ds_cfg.image_size={h} (square images) or augment="
                       f"'imagenet'.")
  return info, augment, int(size)


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


class _ReadShuffled:
  """``position -> dict(image=uint8 HWC, label=int)`` through the shuffle."""

  def __init__(self, source: Any, shuffle: _EpochShuffle):
    self.source = source
    self.shuffle = shuffle

  def __call__(self, position: int) -> dict[str, Any]:
    return self.source[self.shuffle(position)]


class _Augment:
  """grain ``random_map`` function: augments the image of one example."""

  def __init__(self, transform: augment_lib.TrainTransform):
    self.transform = transform

  def __call__(self, example: dict[str, Any],
               rng: np.random.Generator) -> dict[str, Any]:
    return {"image": self.transform(example["image"], rng),
            "label": example["label"]}


class _Collate:
  """Stacks uint8 examples into a normalized float32 NHWC batch.

  Normalizing the whole batch at once is several times faster than per image.
  """

  def __init__(self, mean: Any, std: Any):
    self.mean = tuple(float(m) for m in mean)
    self.std = tuple(float(s) for s in std)

  def __call__(self, examples: list[dict[str, Any]]) -> Batch:
    images = np.stack([ex["image"] for ex in examples])
    return {"image": augment_lib.normalize(images, self.mean, self.std),
            "label": np.asarray([ex["label"] for ex in examples], np.int32)}


def _collate(ds_cfg: Any) -> _Collate:
  return _Collate(sources.cfg_get(ds_cfg, "mean"),
                  sources.cfg_get(ds_cfg, "std"))


def _derived_seed(seed: int, tag: int) -> int:
  """A 32-bit seed (what grain accepts) decorrelated from ``seed`` and ``tag``."""
  return int(np.random.SeedSequence([seed, tag]).generate_state(1)[0])


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
    ``grain.MapDataset`` whose element ``s`` is ``dict(image=float32
    (B, H, W, 3) NHWC normalized as (x/255 - mean)/std, label=int32 (B,))`` with
    ``B = global_batch_size // process_count``. See the module docstring for
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
  train_source, _ = sources.get_sources(ds_cfg)
  shuffle = _EpochShuffle(len(train_source), int(seed))
  transform = augment_lib.train_transform(augment, size)

  stream = grain.MapDataset.range(num_steps * global_batch_size)
  stream = stream.map(_ReadShuffled(train_source, shuffle))
  # grain seeds the generator from (seed, index in *this* dataset), i.e. the
  # stream position, so augmentation does not depend on process_count.
  stream = stream.random_map(_Augment(transform),
                             seed=_derived_seed(int(seed), _AUGMENT_TAG))
  # Local batch j holds positions [j B, (j + 1) B); global step s is local
  # batches s n .. s n + n - 1, so process k takes every n-th from k. The
  # stream length is a multiple of B: drop_remainder never drops anything.
  batches = stream.batch(local_batch, drop_remainder=True,
                         batch_fn=_collate(ds_cfg))
  return batches[process_index::process_count]


def train_iterator(train_ds: grain.MapDataset, start_step: int = 0,
                   num_threads: int = 2,
                   prefetch_batches: int | None = None) -> Iterator[Batch]:
  """Iterates batches ``start_step, start_step + 1, ...`` with prefetching.

  Args:
    train_ds: from :func:`train_dataset`.
    start_step: first step to yield (``0 <= start_step <= len(train_ds)``).
    num_threads: grain reader threads, each building whole batches; 0 reads
      synchronously in the caller's thread.
    prefetch_batches: batches buffered ahead (default ``2 * num_threads``);
      bounded because a buffered ImageNet batch is ~150 MB.

  Returns:
    A Python iterator over batch dicts (see :func:`train_dataset`).
  """
  if not 0 <= start_step <= len(train_ds):
    raise ValueError(f"start_step={start_step} is outside [0, "
                     f"{len(train_ds)}].")
  if prefetch_batches is None:
    prefetch_batches = 2 * num_threads
  options = grain.ReadOptions(num_threads=max(0, int(num_threads)),
                              prefetch_buffer_size=max(0, prefetch_batches))
  return iter(train_ds[start_step:].to_iter_dataset(options))


# ----------------------------------------------------------------------------
# evaluation


class _EvalBatch:
  """``step -> local eval batch`` with zero padding and a validity mask."""

  def __init__(self, source: Any, transform: augment_lib.EvalTransform,
               global_batch: int, local_batch: int, process_index: int,
               size: int, collate: _Collate):
    self.source = source
    self.transform = transform
    self.global_batch = global_batch
    self.local_batch = local_batch
    self.process_index = process_index
    self.size = size
    self.collate = collate

  def __call__(self, step: int) -> Batch:
    start = step * self.global_batch + self.process_index * self.local_batch
    n = len(self.source)
    examples = []
    for index in range(start, start + self.local_batch):
      if index < n:
        ex = self.source[index]
        examples.append({"image": self.transform(ex["image"]),
                         "label": ex["label"]})
      else:
        examples.append({"image": np.zeros((self.size, self.size, 3),
                                           np.uint8), "label": 0})
    batch = self.collate(examples)
    mask = np.arange(start, start + self.local_batch) < n
    batch["image"][~mask] = 0.0  # Padding is exactly zero, not -mean/std.
    batch["mask"] = mask
    return batch


def eval_dataset(ds_cfg: Any, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> grain.MapDataset:
  """Random-access dataset of this process's evaluation batches.

  Global batch ``s`` holds test examples ``[s G, (s + 1) G)`` in order, split
  into ``process_count`` contiguous chunks; there are ``ceil(num_test / G)``
  steps on every process. Elements are ``dict(image=float32 (B, H, W, 3),
  label=int32 (B,), mask=bool (B,))``; padding has image 0, label 0, mask False.
  """
  local_batch = _check_sharding(global_batch_size, process_index,
                                process_count)
  _, augment, size = _check_cfg(ds_cfg)
  _, test_source = sources.get_sources(ds_cfg)
  num_steps = math.ceil(len(test_source) / global_batch_size)
  make_batch = _EvalBatch(test_source, augment_lib.eval_transform(augment, size),
                          global_batch_size, local_batch, process_index, size,
                          _collate(ds_cfg))
  return grain.MapDataset.range(num_steps).map(make_batch)


def eval_batches(ds_cfg: Any, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """Yields the batches of :func:`eval_dataset`, prefetched by
  ``ds_cfg.num_threads`` (default 2) grain threads."""
  ds = eval_dataset(ds_cfg, global_batch_size, process_index, process_count)
  num_threads = int(sources.cfg_get(ds_cfg, "num_threads", 2) or 0)
  yield from train_iterator(ds, 0, num_threads)
