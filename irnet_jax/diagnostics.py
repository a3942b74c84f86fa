"""Information-retention diagnostics of binary networks (IR-Net, Qin et al. 2020).

Pure functions over model state, usable eagerly or under ``jax.jit`` / ``nnx.jit``.
Python loops here run over the *layers* at trace time only; the compiled program
is one fused computation, and re-calling it with new weights, a new EDE or new
activations does not recompile.

Statistics (all dimensionless; entropies in bits):

* :func:`entropy_bits` -- Bernoulli entropy of a sign tensor (IR-Net maximizes it
  for the binary weights with Libra-PB, Eq. 5-7).
* :func:`sign_balance` -- fraction of +1 per output channel.
* :func:`quantization_error` -- relative L2 error of the weight quantizer.
* :func:`flip_ratio` -- fraction of binary weights whose sign changed.
* :func:`ede_grad_scale` -- mean magnitude of the EDE's backward multiplier.

Model-level: :func:`binary_layers`, :func:`weight_signs` and :func:`measure`
(a flat ``dict[str, scalar]`` for the metrics log; see its docstring for keys).
:func:`binary_conv_inputs` collects the inputs the binary layers sow
(:class:`irnet_jax.layers.BinaryInput`) during one forward pass under ``nnx.capture``.

Training logs :func:`measure` every ``config.analysis_every_steps`` steps as the
"analysis" split of ``metrics.jsonl`` (names kept so that old configs and runs
still read); :mod:`irnet_jax.report` plots them.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from irnet_jax import binarize, layers, ops

# ----------------------------------------------------------------------------------
# Tensor statistics.


def entropy_bits(b: jax.Array, axis: int | tuple[int, ...] | None = None) -> jax.Array:
  """Entropy in bits of the binary tensor ``b > 0``: ``-p log2 p - (1-p) log2(1-p)``.

  ``p`` is the fraction of strictly positive entries over ``axis`` (None: all).
  Zeros (``sign(0) == 0`` in :mod:`irnet_jax.ops`) count as "not +1", i.e. with
  the -1s: entropy is that of the binary *event* "is +1", which for a ``sign``
  tensor without zeros is the entropy of the binary weights. ``p in {0, 1}`` gives 0
  (the ``0 log 0 = 0`` convention), without NaNs in the value or its trace.

  Args:
    b: any real tensor, typically ``sign(w)`` or a quantized kernel.
    axis: axes to reduce over, like ``jnp.mean``.

  Returns:
    float32 entropy in ``[0, 1]``, with the reduced axes removed.
  """
  p = jnp.mean((b > 0).astype(jnp.float32), axis=axis)
  return _binary_entropy(p)


def _binary_entropy(p: jax.Array) -> jax.Array:
  # Substitute a safe operand where p is 0 or 1 so that log2 never sees 0.
  def term(q):
    safe = jnp.where(q > 0, q, 1.0)
    return jnp.where(q > 0, -q * jnp.log2(safe), 0.0)
  return term(p) + term(1.0 - p)


def sign_balance(kernel_q: jax.Array) -> jax.Array:
  """Per-output-channel fraction of +1 of a (quantized) kernel, ``(..., out) -> (out,)``.

  The last axis is the output channel (HWIO convs, ``(in, out)`` dense); 0.5 means
  a balanced filter. Zeros count as not +1, as in :func:`entropy_bits`.
  """
  axes = tuple(range(kernel_q.ndim - 1))
  return jnp.mean((kernel_q > 0).astype(jnp.float32), axis=axes)


def _relative_error(x: jax.Array, q: jax.Array) -> jax.Array:
  x, q = x.astype(jnp.float32), q.astype(jnp.float32)
  return jnp.linalg.norm((x - q).ravel()) / jnp.linalg.norm(x.ravel())


def quantization_error(kernel: jax.Array, quantizer: str = "libra_pb") -> jax.Array:
  """Relative L2 error ``||x - Q(kernel)|| / ||x||`` of a weight quantizer, a float32
  scalar: ``x`` what its sign sees (:func:`ops.weight_sign_input`), ``Q`` its forward
  (:func:`ops.quantize_weights`), for every quantizer of :data:`ops.WEIGHT_QUANTIZERS`.

  * "libra_pb": ``x = standardize(kernel)``, ``Q = 2^round(log2 mean|x|) * sign(x)``
    per output channel. Scale-invariant in the kernel, so comparable across layers and
    over training.
  * "sign": ``Q = sign(kernel)``, no scale: it depends on the kernel's magnitude (it is
    ~``1/mean|w|`` for small weights and can exceed 1); the BN after each conv absorbs
    that scale, so compare it only between steps of the same run.
  * "mean_abs", "mean_abs_detached" (XNOR-Net, Bi-Real, ReActNet): ``Q = mean|w| *
    sign(w)`` per output channel, the least-squares binary approximation of ``w``.
  * "none": 0 (no quantization).
  """
  x = ops.weight_sign_input(kernel, quantizer)
  return _relative_error(x, ops.quantize_weights(kernel, quantizer, "ste"))


def flip_ratio(signs_a: jax.Array, signs_b: jax.Array) -> jax.Array:
  """Fraction of entries whose sign differs between two states (float32 scalar).

  Inputs are sign tensors (e.g. int8 from :func:`weight_signs`) or raw weights;
  both are passed through ``sign`` first, so a 0 <-> +-1 change counts as a flip.
  """
  return jnp.mean((jnp.sign(signs_a) != jnp.sign(signs_b)).astype(jnp.float32))


def ede_grad_scale(x: jax.Array, ede: ops.EDE) -> jax.Array:
  """``mean |k t (1 - tanh^2(t x))|``: how much gradient the EDE passes through ``sign(x)``.

  ``k * t`` at ``x = 0``; decays to 0 for ``|x| >> 1/t``. Early in training (small
  t, ``k = 1/t``) it is ~1 everywhere, like an identity; late (t = 10) it is
  concentrated on ``|x| < 0.1``. Float32 scalar.
  """
  t = jnp.asarray(ede.t, jnp.float32)
  k = jnp.asarray(ede.k, jnp.float32)
  x = x.astype(jnp.float32)
  return jnp.mean(jnp.abs(k * t * (1.0 - jnp.square(jnp.tanh(t * x)))))


# ----------------------------------------------------------------------------------
# The paper's Libra-PB entropy claim (Sec. 3.1, Fig. 3).


def skewed_gaussian_kernel(key: jax.Array, shape: tuple[int, ...] = (3, 3, 64, 64),
                           mean: float = 0.5, std: float = 1.0) -> jax.Array:
  """An HWIO kernel drawn from ``N(mean, std^2)``: with ``mean != 0`` its plain sign
  is unbalanced (``P(+1) = Phi(mean/std)``), the case Libra-PB is designed for."""
  return mean + std * jax.random.normal(key, shape, jnp.float32)


def weight_entropy_by_quantizer(kernel: jax.Array) -> dict[str, jax.Array]:
  """Weight entropy (bits) of ``kernel`` under Libra-PB and under plain sign.

  IR-Net's claim: Libra-PB's per-channel centering makes ``P(+1) ~ 1/2`` in each
  filter, so its entropy is ~1 bit and at least that of ``sign(kernel)`` whenever
  the kernel is skewed (e.g. :func:`skewed_gaussian_kernel`). Returns
  ``{"libra_pb": H, "sign": H}``, float32 scalars.
  """
  return {"libra_pb": entropy_bits(ops.libra_pb(kernel)),
          "sign": entropy_bits(jnp.sign(kernel))}


# ----------------------------------------------------------------------------------
# Model-level diagnostics.


def _dotted(path: tuple) -> str:
  return ".".join(str(p) for p in path)


def binary_layers(model: nnx.Module) -> dict[str, layers.BinaryConv | layers.BinaryDense]:
  """:func:`irnet_jax.binarize.binary_layers` (every layer with binary weights or
  activations, by torch-style dotted path ``"layer1.0.conv1"``), sorted by path."""
  return dict(sorted(binarize.binary_layers(model).items()))


def _sign_input(layer: layers.BinaryConv) -> jax.Array:
  """What the weight sign is applied to: standardized weights for Libra-PB."""
  return ops.weight_sign_input(layer.kernel[...], layer.weight_quantizer)


def weight_signs(model: nnx.Module) -> dict[str, jax.Array]:
  """``sign`` of the quantized kernel of every binary-weight layer, int8 HWIO.

  Keyed like :func:`binary_layers`; keep the result to pass as ``prev_signs`` to
  the next :func:`measure` call (1 byte per weight).
  """
  return {name: jnp.sign(_sign_input(layer)).astype(jnp.int8)
          for name, layer in binary_layers(model).items() if layer.binary_weights}


def binary_conv_inputs(model: nnx.Module, x: jax.Array,
                       ede: ops.EDE | None = None) -> dict[str, jax.Array]:
  """Input activations (before binarization) of each binary-activation conv on batch ``x``.

  Runs the forward pass on a *copy* of ``model`` in its current mode (train: batch
  statistics, as training sees them; eval: running statistics), so the model's BN
  statistics are not updated. ``x``: NHWC model inputs. Returns NHWC arrays.
  """
  # New Variable objects sharing the arrays: BN-statistic updates stay on the copy
  # (with split/merge they would reach the caller's Variables under nnx.jit).
  copy = nnx.clone(model)
  wanted = {name for name, layer in binary_layers(copy).items() if layer.binary_acts}
  if ede is not None:
    binarize.set_ede(copy, ede)
  # The layers sow their inputs only inside nnx.capture (layers.BinaryInput); a layer
  # called more than once keeps its first input. Paths: nnx.iter_graph's, as wanted's.
  _, sown = nnx.capture(copy, layers.BinaryInput)(x)
  out = {}
  for path, value in nnx.to_flat_state(sown):
    name = _dotted(path[:-1])  # path[-1] is "binary_input"
    if name in wanted:
      out[name] = value.get_value()[0]
  return out


def measure(model: nnx.Module, ede: ops.EDE | None = None,
                prev_signs: Mapping[str, jax.Array] | None = None,
                activations: jax.Array | None = None) -> dict[str, jax.Array]:
  """Compact information-retention metrics for logging; float32 scalars.

  Keys (``<layer>`` is a dotted path from :func:`binary_layers`):

  * ``weight_entropy/<layer>``, ``weight_entropy_mean`` -- bits of the weight signs.
  * ``quant_error/<layer>``, ``quant_error_mean`` -- :func:`quantization_error`.
  * ``ede_grad_scale_w`` -- :func:`ede_grad_scale` on the input of each weight sign
    (standardized weights for Libra-PB), averaged over layers.
  * with ``prev_signs`` (an earlier :func:`weight_signs`): ``flip_ratio/<layer>``,
    ``flip_ratio_mean``.
  * with ``activations`` (a batch of model inputs, NHWC): ``act_entropy/<layer>``,
    ``act_entropy_mean`` (bits of ``sign`` of each binary conv's input),
    ``ede_grad_scale_a/<layer>``, ``ede_grad_scale_a`` (mean over layers).

  Keys of a kind are absent when no layer has it (e.g. no weight keys for 32w1a;
  no flip ratios for layers missing from ``prev_signs``). The "ede_grad_scale" keys
  evaluate the EDE multiplier whatever the layer's estimator is.

  Jit with ``nnx.jit(measure)`` or :func:`measure_state`; it recompiles
  only if the presence of ``prev_signs``/``activations`` or a shape changes.
  Nothing of ``model`` is modified (the activation pass runs on a clone).
  """
  ede = ops.DEFAULT_EDE if ede is None else ede
  out: dict[str, jax.Array] = {}
  ent, err, grad, flips = [], [], [], []
  for name, layer in binary_layers(model).items():
    if not layer.binary_weights:
      continue
    x = _sign_input(layer)
    h = entropy_bits(x)
    e = quantization_error(layer.kernel[...], layer.weight_quantizer)
    out[f"weight_entropy/{name}"], out[f"quant_error/{name}"] = h, e
    ent.append(h)
    err.append(e)
    grad.append(ede_grad_scale(x, ede))
    if prev_signs is not None and name in prev_signs:
      f = flip_ratio(jnp.sign(x).astype(jnp.int8), prev_signs[name])
      out[f"flip_ratio/{name}"] = f
      flips.append(f)
  # Means only over layers that exist: a 32w1a model has no weight keys at all,
  # rather than misleading zeros.
  if ent:
    out["weight_entropy_mean"] = jnp.mean(jnp.stack(ent))
    out["quant_error_mean"] = jnp.mean(jnp.stack(err))
    out["ede_grad_scale_w"] = jnp.mean(jnp.stack(grad))
  if flips:
    out["flip_ratio_mean"] = jnp.mean(jnp.stack(flips))
  if activations is not None:
    a_ent, a_grad = [], []
    for name, x in binary_conv_inputs(model, activations, ede).items():
      h, g = entropy_bits(x), ede_grad_scale(x, ede)
      out[f"act_entropy/{name}"], out[f"ede_grad_scale_a/{name}"] = h, g
      a_ent.append(h)
      a_grad.append(g)
    if a_ent:
      out["act_entropy_mean"] = jnp.mean(jnp.stack(a_ent))
      out["ede_grad_scale_a"] = jnp.mean(jnp.stack(a_grad))
  return out


def measure_state(graphdef: nnx.GraphDef, state: nnx.State, ede: ops.EDE | None = None,
                  prev_signs: Mapping[str, jax.Array] | None = None,
                  activations: jax.Array | None = None) -> dict[str, jax.Array]:
  """:func:`measure` on ``nnx.merge(graphdef, state)``, for ``jax.jit``:

      fn = jax.jit(measure_state, static_argnums=0)
      metrics = fn(graphdef, state, ede, prev_signs, x)
  """
  return measure(nnx.merge(graphdef, state), ede, prev_signs, activations)


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
  """Device scalars -> Python floats (for ``metrics.jsonl``); NaN/inf kept as floats."""
  return {k: float(v) for k, v in jax.device_get(dict(metrics)).items()}


__all__ = ["entropy_bits", "sign_balance", "quantization_error", "flip_ratio",
           "ede_grad_scale", "skewed_gaussian_kernel", "weight_entropy_by_quantizer",
           "binary_layers", "weight_signs", "binary_conv_inputs",
           "measure", "measure_state", "to_floats"]
