"""Every network of ``models.REGISTRY`` against the PyTorch reference, float64, without torch.

The golden files ``tests/golden/NAME.npz`` were written by
``python experiments/make_golden.py --out tests/golden`` from the official networks
re-implemented in ``experiments/torch_reference.py``; their inputs (weights with
perturbed BN statistics, images) are regenerated here by ``tests/golden_inputs.py`` and
checked against the file's checksum. Compared: eval outputs, train-mode outputs and
loss at one EDE point, BN running statistics after that forward, and every parameter
gradient (whole where small, else sum / norm / probe plus a slice).

Measured differences are float64 rounding only: at most 2e-12 of the tensor's max
|value| (gradients of the 1w32a ResNet-34), most below 1e-14; the tolerance is 1e-10.
"""
import json
import os

import golden_inputs
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from irnet_jax import binarize, convert, models, ops

GOLDEN_DIR = os.path.join(os.path.dirname(__file__), "golden")
TOL = 1e-10  # Max |jax - torch| relative to the reference tensor's max |value|.
REGENERATE = "python experiments/make_golden.py --out tests/golden --models {}"


def _check(got, want, what: str, scale: float | None = None) -> None:
  """max |got - want| <= TOL * scale; scale defaults to max |want| (relative per tensor)."""
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape, f"{what}: shape {got.shape} != reference {want.shape}"
  scale = float(np.max(np.abs(want))) if scale is None else scale
  bound = TOL * max(scale, 1e-300)  # All-zero references (unused bn3) must match exactly.
  err = float(np.max(np.abs(got - want)))
  assert err <= bound, f"{what}: max |jax - torch| = {err:.3e} > {bound:.1e}"


def _load(name: str):
  path = os.path.join(GOLDEN_DIR, f"{name}.npz")
  if not os.path.exists(path):
    pytest.fail(f"model {name!r} has no golden file {path}: add its official network to "
                f"experiments/torch_reference.py MODELS, then run `{REGENERATE.format(name)}` "
                "(needs torch).")
  ref = np.load(path)
  meta = json.loads(str(ref["meta"]))
  weights = golden_inputs.state_dict(meta["state_dict"], meta["seed"])
  size = meta["image_size"]
  x = golden_inputs.images((meta["batch"], 3, size, size), meta["seed"])
  assert golden_inputs.checksum(weights, x) == meta["inputs_sha256"], (
      f"tests/golden_inputs.py no longer makes the inputs {path} was made from; if the "
      f"change is intended, regenerate the files: `{REGENERATE.format(name)}`.")
  return ref, meta, weights, x


@nnx.jit
def _train_pass(model, x, y, t, k):
  def loss_fn(m):
    binarize.set_ede(m, ops.EDE(t, k))
    logits = m(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  (loss, logits), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
  return loss, logits, grads


@nnx.jit
def _eval_pass(model, x):
  return model(x)


def _cases():
  # ImageNet networks compile for ~10-20 s each on 2 cores: marked slow (still run by default).
  return [pytest.param(name, marks=[pytest.mark.slow] if models.REGISTRY[name].input_size > 32
                       else []) for name in sorted(models.REGISTRY)]


@pytest.mark.parametrize("name", _cases())
def test_matches_pytorch_reference(name, x64):
  ref, meta, weights, x = _load(name)
  # Abstract init (no random draws to compile): every variable comes from `weights`.
  model = nnx.eval_shape(lambda: models.create(name, num_classes=meta["num_classes"],
                                               param_dtype=jnp.float64))
  convert.load_torch_state_dict(model, weights)  # Also checks every key and shape.
  x = jnp.asarray(x.transpose(0, 2, 3, 1))  # NCHW -> NHWC
  # Where the official model ends in LogSoftmax, ours returns the logits (README).
  output = jax.nn.log_softmax if meta["output"] == "log_softmax" else (lambda z: z)

  model.eval()
  _check(output(_eval_pass(model, x)), ref["eval_out"], "eval output")
  model.train()
  loss, logits, grads = _train_pass(model, x, jnp.asarray(ref["y"]),
                                    jnp.float64(meta["t"]), jnp.float64(meta["k"]))
  _check(output(logits), ref["train_out"], f"train output at EDE t={meta['t']}")
  _check(loss, ref["loss"], "loss")

  state = convert.to_torch_state_dict(nnx.state(model))
  stats = [k for k in ref.files if k.startswith("stat/")]
  assert len(stats) == 2 * sum(k.endswith(".running_mean") for k, _ in meta["state_dict"])
  for key in stats:
    _check(state[key[len("stat/"):]], ref[key], f"BN statistic {key[5:]} after the step")

  grads = convert.to_torch_state_dict(grads)
  summaries = {k[len("grad_summary/"):] for k in ref.files if k.startswith("grad_summary/")}
  assert summaries == set(grads), f"parameters differ from the reference: " \
                                  f"{sorted(summaries ^ set(grads))}"
  for key, g in grads.items():
    want = ref[f"grad_summary/{key}"]
    # sum and probe add up n rounding errors: scale by the L1 bound sqrt(n) * norm.
    _check(golden_inputs.summary(key, g), want, f"gradient summary of {key}",
           scale=np.sqrt(g.size) * want[1])
    if f"grad/{key}" in ref.files:
      _check(g, ref[f"grad/{key}"], f"gradient of {key}")
    if f"grad_slice/{key}" in ref.files:
      _check(g[0], ref[f"grad_slice/{key}"], f"gradient of {key}[0]")
