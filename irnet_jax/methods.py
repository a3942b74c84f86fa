"""Binarization methods as data: what each method does to a layer's weights and inputs.

A :class:`Method` names the forward quantizer of the weights, the backward estimator of
each sign, the extra per-channel parameters (ReActNet's learnable thresholds and
RPReLU) and which layers stay real-valued. :func:`irnet_jax.binarize.binarize_model`
and the binary layers (:mod:`irnet_jax.layers`) read it; nothing else does. Adding a
method = one entry in :data:`METHODS` (tests/test_methods.py checks each against its
paper's formulas).

What every method here keeps real-valued (all five papers do): the first convolution
(it sees the image), the last linear layer (it makes the logits) and the 1x1 strided
"downsample" convolutions of residual shortcuts. Bi-Real Net's and ReActNet's other
structural change, a real-valued shortcut around every binary convolution, is a
property of the network, not of a layer: the registry ResNets have it
(``structure="bireal"``); ``binarize_model`` cannot add it to a user's network.
"""
from __future__ import annotations

import dataclasses

from irnet_jax import ops

KEEP_RULES = ("first_conv", "last_linear", "downsample")


@dataclasses.dataclass(frozen=True)
class Method:
  """One binarization method.

  Attributes:
    name: the registry key (``config.model.binarize``, ``binarize_model(method=)``).
    weight_quantizer: forward of the weights, one of :data:`ops.WEIGHT_QUANTIZERS`.
    weight_estimator: backward of the weights' sign, one of :data:`ops.ESTIMATORS`.
    act_estimator: backward of the inputs' sign, one of :data:`ops.ESTIMATORS`.
    act_threshold: ReActNet's RSign: inputs are binarized as ``sign(x - a)`` with a
      learnable threshold ``a`` per input channel (initialized at 0).
    rprelu: ReActNet's RPReLU (:func:`ops.rprelu`) on each binary layer's output.
    keep: layers that stay real-valued (:data:`KEEP_RULES`).
    paper: where the method comes from.
    note: how this implementation differs from the paper, if at all.
  """
  name: str
  weight_quantizer: str
  weight_estimator: str
  act_estimator: str
  act_threshold: bool = False
  rprelu: bool = False
  keep: tuple[str, ...] = KEEP_RULES
  paper: str = ""
  note: str = ""

  @property
  def uses_ede(self) -> bool:
    """Whether the layers need EDE's (t, k) (:func:`irnet_jax.binarize.set_progress`)."""
    return "ede" in (self.weight_estimator, self.act_estimator)

  def layer_kwargs(self) -> dict:
    """Keyword arguments of :class:`irnet_jax.layers.BinaryConv` / ``BinaryDense``."""
    return dict(weight_bits=1, act_bits=1, weight_quantizer=self.weight_quantizer,
                weight_estimator=self.weight_estimator, estimator=self.act_estimator,
                act_threshold=self.act_threshold, rprelu=self.rprelu)


_METHODS = (
    Method("irnet", "libra_pb", "ede", "ede",
           paper="Qin et al., Forward and Backward Information Retention for Accurate "
                 "Binary Neural Networks (IR-Net), CVPR 2020",
           note="Libra-PB weights (standardize, sign, power-of-two scale), EDE for both "
                "signs; the official code's semantics (irnet_jax.ops)."),
    Method("bnn", "sign", "ste", "ste",
           paper="Hubara, Courbariaux et al., Binarized Neural Networks, NeurIPS 2016",
           note="sign weights and inputs, clipped straight-through estimator. The paper "
                "also clips the latent weights to [-1, 1] after each update; optax does "
                "not, so weights outside [-1, 1] stop receiving gradient instead."),
    Method("xnor", "mean_abs", "ste", "ste",
           paper="Rastegari et al., XNOR-Net: ImageNet Classification Using Binary "
                 "Convolutional Neural Networks, ECCV 2016",
           note="weights sign(w) * mean|w| per output channel with the scale's gradient; "
                "the activation scaling K is omitted (as in most reimplementations: BN "
                "after the convolution absorbs it)."),
    Method("bireal", "mean_abs_detached", "ste", "approx_sign",
           paper="Liu et al., Bi-Real Net: Enhancing the Performance of 1-bit CNNs with "
                 "Improved Representational Capability and Advanced Training Algorithm, "
                 "ECCV 2018",
           note="ApproxSign for inputs, magnitude-aware weights (detached mean|w| scale, "
                "clipped STE); the real-valued shortcuts are the network's "
                "(structure='bireal')."),
    Method("reactnet", "mean_abs_detached", "ste", "approx_sign", act_threshold=True,
           rprelu=True,
           paper="Liu et al., ReActNet: Towards Precise Binary Neural Network with "
                 "Generalized Activation Functions, ECCV 2020",
           note="RSign (learnable per-channel threshold) and RPReLU; RPReLU is applied to "
                "each binary layer's output (binarize_model cannot see where the network "
                "applies its own activation); no distributional loss. The launcher trains "
                "thresholds and RPReLU with Adam (config.optimizer.method_params)."),
)
METHODS: dict[str, Method] = {m.name: m for m in _METHODS}


def get(name: str) -> Method:
  """The method called ``name``; a ValueError listing the methods if unknown."""
  if name not in METHODS:
    raise ValueError(f"unknown binarization method {name!r}; choose one of {list(METHODS)}")
  return METHODS[name]


def _check(m: Method) -> None:
  assert m.weight_quantizer in ops.WEIGHT_QUANTIZERS, m
  assert {m.weight_estimator, m.act_estimator} <= set(ops.ESTIMATORS), m
  assert set(m.keep) <= set(KEEP_RULES), m


for _m in _METHODS:
  _check(_m)
