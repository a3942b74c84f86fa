"""Input pipelines for IR-Net training: CIFAR archive / image folder / list file /
TFDS / npz / digits sources, numpy augmentation, deterministic process-sharded
grain datasets (no TensorFlow).

``ds_cfg`` is an ``ml_collections.ConfigDict`` (or any object with attributes,
or a dict) with the fields:

* ``name``: ``"cifar10" | "cifar100" | "imagefolder" | "filelist" | "npz" |
  "digits" | "tfds:NAME"`` (``"imagenet2012"`` = ``"tfds:imagenet2012"``); see
  :mod:`irnet_jax.data.sources`.
* ``data_dir``: CIFAR archive folder (``""``: ``$IRNET_JAX_DATA_DIR`` or
  ``~/.cache/irnet_jax/data``); TFDS data dir for ``tfds:`` names.
* ``path``: the ``.npz`` file; the ImageFolder root (holding ``train_split`` and
  ``test_split`` folders); the default root of list-file paths.
* ``train_split`` / ``test_split``: ImageFolder folder or TFDS split names
  (defaults ``"train"``; ``"val"`` for imagefolder, ``"validation"`` for tfds
  imagenet2012, else ``"test"``).
* ``train_list`` / ``test_list``: list files of ``relative/path label`` lines;
  ``train_root`` / ``test_root``: the folders their paths are relative to, or for
  imagefolder the two split folders themselves (in place of ``path``).
* ``skip_bad_files``: replace undecodable image files instead of failing.
* ``augment``: ``"cifar" | "imagenet" | "shift" | "none"``.
* ``image_size``: side of the model input in pixels (32 / 224 / 16).
* ``mean``, ``std``: RGB 3-tuples in [0, 1] units; batches are uint8 NHWC and
  the jitted step feeds the model float32 ``(x / 255 - mean) / std``
  (``irnet_jax.data.device.model_input``).
* ``num_workers``: grain worker processes (-1: every usable CPU for the
  "imagenet" recipe on stored images larger than 64 pixels, in-process threads
  otherwise); ``num_threads``:
  in-process reader threads (default 2); ``prefetch_mb``: prefetch budget.
* ``color_jitter_on``: ``"device"`` (default) or ``"host"``; ``jpeg_draft``:
  decode JPEGs at a reduced DCT scale when the crop allows.

Typical use::

  info = data.dataset_info(ds_cfg)
  train_ds = data.train_dataset(ds_cfg, 128, seed=0, num_steps=n)
  options = data.loader_options(ds_cfg, local_batch_size)
  for batch in data.train_iterator(train_ds, start_step, **options): ...
  for batch in data.eval_batches(ds_cfg, 256): ...  # has a "mask"
"""
from irnet_jax.data.augment import AUGMENTS, eval_transform, normalize, train_transform
from irnet_jax.data.decode import BadImageError
from irnet_jax.data.pipeline import (
    DatasetInfo,
    color_jitter_on,
    dataset_info,
    eval_batches,
    eval_dataset,
    loader_options,
    resident_arrays,
    train_dataset,
    train_indices,
    train_iterator,
)
from irnet_jax.data.sources import (
  DATASETS,
  ArraySource,
  derived_num_classes,
  get_sources,
  load_digits_arrays,
)

__all__ = [
    "AUGMENTS", "ArraySource", "BadImageError", "DATASETS", "DatasetInfo",
    "color_jitter_on", "dataset_info", "derived_num_classes", "eval_batches", "eval_dataset",
    "eval_transform", "get_sources", "load_digits_arrays", "loader_options",
    "normalize", "resident_arrays", "train_dataset", "train_indices", "train_iterator",
    "train_transform",
]
