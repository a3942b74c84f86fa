"""Input pipelines for IR-Net training: TFDS / npz / digits sources, numpy
augmentation, deterministic process-sharded grain datasets (no TensorFlow).

``ds_cfg`` is an ``ml_collections.ConfigDict`` (or any object with attributes,
or a dict) with the fields:

* ``name``: ``"cifar10" | "cifar100" | "imagenet2012" | "npz" | "digits"``.
* ``data_dir``: TFDS data dir (``None``: TFDS default), for the tfds names.
* ``path``: the ``.npz`` file, for ``"npz"``.
* ``augment``: ``"cifar" | "imagenet" | "shift" | "none"``.
* ``image_size``: side of the model input in pixels (32 / 224 / 16).
* ``mean``, ``std``: RGB 3-tuples in [0, 1] units; images are fed as float32
  NHWC ``(x / 255 - mean) / std``.
* ``num_threads``: grain reader threads for evaluation (default 2).
* ``test_split``: TFDS eval split (default ``"test"``; ``"validation"`` for
  imagenet2012).

Typical use::

  info = data.dataset_info(ds_cfg)
  train_ds = data.train_dataset(ds_cfg, 128, seed=0, num_steps=n)
  for batch in data.train_iterator(train_ds, start_step, num_threads=2): ...
  for batch in data.eval_batches(ds_cfg, 256): ...  # has a "mask"
"""
from irnet_jax.data.augment import AUGMENTS
from irnet_jax.data.augment import eval_transform
from irnet_jax.data.augment import normalize
from irnet_jax.data.augment import train_transform
from irnet_jax.data.pipeline import DatasetInfo
from irnet_jax.data.pipeline import dataset_info
from irnet_jax.data.pipeline import eval_batches
from irnet_jax.data.pipeline import eval_dataset
from irnet_jax.data.pipeline import train_dataset
from irnet_jax.data.pipeline import train_iterator
from irnet_jax.data.sources import ArraySource
from irnet_jax.data.sources import DATASETS
from irnet_jax.data.sources import get_sources
from irnet_jax.data.sources import load_digits_arrays

__all__ = [
    "AUGMENTS", "ArraySource", "DATASETS", "DatasetInfo", "dataset_info",
    "eval_batches", "eval_dataset", "eval_transform", "get_sources",
    "load_digits_arrays", "normalize", "train_dataset", "train_iterator",
    "train_transform",
]
