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
