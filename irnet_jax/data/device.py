"""The device half of the input pipeline, traced into the jitted train/eval step.

Host batches stay uint8 NHWC (a quarter of float32's bytes on the host, in the
prefetch buffers and on the wire); here they become the model input:

  x = images / 255                                  float32 NHWC in [0, 1]
  x = colour_jitter(x, key(seed, step), ...)       training, when on the device
  x = (x - mean) / std

The colour jitter is torchvision's ``ColorJitter`` (random order of
brightness / contrast / saturation / hue, its tensor formulas), drawn per
example from ``fold_in(key(seed, step), example)`` with ``example`` the index in
the *global* batch: a pure function of (seed, step) whatever the mesh, so a
resumed run is the same run, and one compilation serves every step (the step
is traced). The formulas are :mod:`irnet_jax.data.augment`'s, evaluated with
``jax.numpy``; the host placement (``dataset.color_jitter_on="host"``) runs the
same functions in numpy in the worker processes.

Not imported by ``irnet_jax.data`` itself, so the grain worker processes that
decode images never import JAX.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from irnet_jax.data import augment

_JITTER_TAG = 0xC017


def jitter_key(seed: int, step: jax.Array) -> jax.Array:
  """The colour-jitter key of training step ``step`` (traced) of run ``seed``."""
  key = jax.random.fold_in(jax.random.key(seed), _JITTER_TAG)
  return jax.random.fold_in(key, step)


def color_jitter_params(key: jax.Array,
                        strengths: Sequence[float] = augment.COLOR_JITTER
                        ) -> tuple[jax.Array, jax.Array]:
  """``(order int32 (4,), factors float32 (4,))`` for one image, distributed as
  :func:`augment.color_jitter_params` (a permutation, then the four factors)."""
  b, c, s, h = strengths
  order_key, factor_key = jax.random.split(key)
  order = jax.random.permutation(order_key, 4)
  lo = jnp.array([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h],
                 jnp.float32)
  hi = jnp.array([1 + b, 1 + c, 1 + s, h], jnp.float32)
  factors = jax.random.uniform(factor_key, (4,), jnp.float32, lo, hi)
  return order, factors


def apply_color_jitter(x: jax.Array, order: jax.Array,
                       factors: jax.Array) -> jax.Array:
  """:func:`augment.apply_color_jitter` with a traced ``order``: float32
  ``(H, W, 3)`` in [0, 1] -> same."""
  branches = [lambda y, f, op=op: op(y, f, jnp) for op in augment.JITTER_OPS]
  for slot in range(4):
    x = jax.lax.switch(order[slot], branches, x, factors[order[slot]])
  return x


def color_jitter(images: jax.Array, key: jax.Array,
                 strengths: Sequence[float] = augment.COLOR_JITTER
                 ) -> jax.Array:
  """Per-example ``ColorJitter(*strengths)`` of float32 NHWC in [0, 1]; image
  ``i`` draws from ``fold_in(key, i)``."""
  keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
      jnp.arange(images.shape[0]))
  order, factors = jax.vmap(lambda k: color_jitter_params(k, strengths))(keys)
  return jax.vmap(apply_color_jitter)(images, order, factors)


def model_input(images: jax.Array, mean: Sequence[float], std: Sequence[float],
                jitter: jax.Array | None = None) -> jax.Array:
  """A batch as the model sees it.

  Args:
    images: uint8 NHWC in [0, 255] from the input pipeline, or floats, which
      are taken as already normalized and returned unchanged (tests, parity
      checks and benchmarks feed those).
    mean, std: per-channel (RGB) in [0, 1] units.
    jitter: a key from :func:`jitter_key` to colour-jitter the batch, or None.

  Returns:
    float32 NHWC ``(x / 255 - mean) / std`` (for uint8 input).
  """
  if jnp.issubdtype(images.dtype, jnp.floating):
    return images
  x = images.astype(jnp.float32) / 255.0
  if jitter is not None:
    x = color_jitter(x, jitter)
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


# ------------------------------------------------------------------ resident data

_AUGMENT_TAG = 0xA06D
# Zero border of the pad-and-crop recipes, in pixels (as the host transforms).
_PAD = {"cifar": 4, "shift": 1}
DEVICE_AUGMENTS = ("cifar", "shift", "none")


def example_keys(seed: int, positions: jax.Array) -> jax.Array:
  """One key per example, from its position in the training stream (step * B + i,
  ``i`` the index in the *global* batch): the same draws whatever the mesh."""
  key = jax.random.fold_in(jax.random.key(seed), _AUGMENT_TAG)
  return jax.vmap(lambda p: jax.random.fold_in(key, p))(positions)


def pad_crop_flip(image: jax.Array, key: jax.Array, size: int, pad: int,
                  flip: bool) -> jax.Array:
  """One uint8 ``(H, W, C)`` image: zero-pad ``pad`` pixels, crop ``size^2`` at a
  uniform offset, mirror left-right with probability 1/2 (``flip``): the host's
  :func:`augment.cifar_augment` / :func:`augment.shift_augment`, drawn from ``key``."""
  h, w, _ = image.shape
  crop_key, flip_key = jax.random.split(key)
  top, left = jax.random.randint(crop_key, (2,), 0,
                                 jnp.array([h + 2 * pad - size + 1, w + 2 * pad - size + 1]))
  padded = jnp.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  out = jax.lax.dynamic_slice(padded, (top, left, 0), (size, size, image.shape[2]))
  if flip:
    out = jnp.where(jax.random.bernoulli(flip_key), out[:, ::-1], out)
  return out


def gather_train_batch(train_image: jax.Array, train_label: jax.Array, index: jax.Array,
                       step: jax.Array, seed: int, augment_name: str,
                       size: int) -> tuple[jax.Array, jax.Array]:
  """A training batch from the training set held on the device.

  Args:
    train_image: uint8 ``(N, H, W, 3)`` NHWC, the whole training set (replicated).
    train_label: int32 ``(N,)``.
    index: int32 ``(B,)`` rows of this step (the host's epoch shuffle), sharded over the
      mesh's data axis: each device gathers its own share.
    step: the optimizer step (traced); example ``i`` draws its augmentation from stream
      position ``step * B + i``.
    seed: the run's seed.
    augment_name: one of :data:`DEVICE_AUGMENTS` (the recipes of in-memory data sets).
    size: side of the output, in pixels.

  Returns:
    ``(uint8 (B, size, size, 3), int32 (B,))``.
  """
  if augment_name not in DEVICE_AUGMENTS:
    raise ValueError(f"dataset.augment={augment_name!r} cannot run on the device; "
                     f"cache_on_device supports {list(DEVICE_AUGMENTS)}.")
  images = jnp.take(train_image, index, axis=0)
  labels = jnp.take(train_label, index, axis=0)
  if augment_name == "none":
    return images, labels
  positions = step.astype(jnp.int32) * index.shape[0] + jnp.arange(index.shape[0])
  keys = example_keys(seed, positions)
  crop = lambda im, k: pad_crop_flip(im, k, size, _PAD[augment_name],
                                     flip=augment_name == "cifar")
  return jax.vmap(crop)(images, keys), labels
