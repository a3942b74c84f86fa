"""irnet_jax.methods: each binarization method (bnn, xnor, bireal, reactnet, irnet) on a
BinaryDense layer against its paper's formulas, forward and backward, on hand-made inputs;
every expected value is computed here with numpy, not by the code under test. Then each
method through the launcher with the analysis on, evaluated and exported."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irnet_jax import binarize, evaluate, layers, methods, ops, train
from irnet_jax.export.workdir import export_workdir


def _layer(method, **kw):
  layer = layers.BinaryDense(4, 3, use_bias=False, rngs=nnx.Rngs(0),
                             **methods.get(method).layer_kwargs(), **kw)
  layer.kernel[...] = jnp.asarray([[0.5, -2.0, 0.2], [-0.25, 0.5, -0.4],
                                   [1.5, 0.1, 0.6], [-0.75, 1.0, -0.8]])
  return layer


X = jnp.asarray([[0.3, -0.6, 0.0, 1.7]])


def _grads(layer, x=X):
  def loss(m, x):
    return jnp.sum(m(x) * jnp.asarray([[1.0, 2.0, 3.0]]))
  return nnx.grad(loss, argnums=(0, 1))(layer, x)


def test_bnn_sign_and_clipped_ste():
  layer = _layer("bnn")
  w = np.asarray(layer.kernel[...])
  np.testing.assert_array_equal(layer(X), np.sign(X) @ np.sign(w))
  gl, gx = _grads(layer)
  g = np.asarray([[1.0, 2.0, 3.0]])
  # Hubara et al.: d sign(r) / dr = 1{|r| <= 1} for weights and inputs.
  np.testing.assert_allclose(gl.kernel[...], (np.sign(X).T @ g) * (np.abs(w) <= 1))
  np.testing.assert_allclose(gx, (g @ np.sign(w).T) * (np.abs(np.asarray(X)) <= 1))


def _scaled_sign_layer(method):
  """A layer of ``method`` after checking XNOR-Net's forward on it, sign(x) @ (sign(w) *
  alpha) with alpha the mean |w| of each output; returns the layer, w and alpha."""
  layer = _layer(method)
  w = np.asarray(layer.kernel[...])
  alpha = np.abs(w).mean(axis=0)
  np.testing.assert_allclose(layer(X), np.sign(X) @ (np.sign(w) * alpha), rtol=1e-6)
  return layer, w, alpha


def test_xnor_scale_with_its_gradient():
  layer, w, alpha = _scaled_sign_layer("xnor")
  gl, _ = _grads(layer)
  g_q = np.sign(np.asarray(X)).T @ np.asarray([[1.0, 2.0, 3.0]])  # dL/dq, (in, out)
  # XNOR-Net Sec. 3.1: dq_i/dw_j = sign(w_i) sign(w_j) / n + alpha 1{|w_i| <= 1} [i = j].
  n = w.shape[0]
  expect = (np.sign(w) * (g_q * np.sign(w)).sum(axis=0) / n
            + g_q * alpha * (np.abs(w) <= 1))
  np.testing.assert_allclose(gl.kernel[...], expect, rtol=1e-6)


def test_bireal_approx_sign_and_detached_scale():
  layer, w, alpha = _scaled_sign_layer("bireal")
  gl, gx = _grads(layer)
  g = np.asarray([[1.0, 2.0, 3.0]])
  x = np.asarray(X)
  # Bi-Real Net Eq. 4 (ApproxSign): d/dx = 2 - 2|x| on |x| < 1, else 0.
  np.testing.assert_allclose(gx, (g @ (np.sign(w) * alpha).T) * np.maximum(2 - 2 * np.abs(x), 0),
                             rtol=1e-6)
  # Magnitude-aware weights: the scale is detached, d/dw = alpha * 1{|w| <= 1}.
  np.testing.assert_allclose(gl.kernel[...], (np.sign(x).T @ g) * alpha * (np.abs(w) <= 1),
                             rtol=1e-6)


def test_reactnet_rsign_and_rprelu():
  layer = _layer("reactnet")
  layer.act_shift[...] = jnp.asarray([0.5, -1.0, 0.1, 0.0])
  layer.rprelu["shift_in"][...] = jnp.asarray([0.1, -0.2, 0.0])
  layer.rprelu["shift_out"][...] = jnp.asarray([1.0, 0.0, -1.0])
  w = np.asarray(layer.kernel[...])
  b = np.sign(np.asarray(X) - np.asarray([0.5, -1.0, 0.1, 0.0]))  # RSign, Eq. 2
  y = b @ (np.sign(w) * np.abs(w).mean(axis=0)) - np.asarray([0.1, -0.2, 0.0])
  expect = np.where(y > 0, y, 0.25 * y) + np.asarray([1.0, 0.0, -1.0])  # RPReLU, Eq. 3
  np.testing.assert_allclose(layer(X), expect, rtol=1e-6)
  gl, _ = _grads(layer)
  # RSign's threshold: d sign(x - a) / da = -ApproxSign'(x - a).
  d = np.asarray(X)[0] - np.asarray([0.5, -1.0, 0.1, 0.0])
  assert np.all((np.abs(gl.act_shift[...]) > 0) == (np.abs(d) < 1))


def test_irnet_dense_is_libra_pb_and_ede():
  layer = _layer("irnet")
  binarize.set_ede(layer, ops.EDE(2.0, 1.0))
  w = layer.kernel[...]
  np.testing.assert_array_equal(layer(X), jnp.sign(X) @ ops.libra_pb(w))
  _, gx = _grads(layer)
  g = np.asarray([[1.0, 2.0, 3.0]]) @ np.asarray(ops.libra_pb(w)).T
  np.testing.assert_allclose(gx, g * 2.0 * (1 - np.tanh(2.0 * np.asarray(X)) ** 2), rtol=1e-6)


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_every_method_trains_with_analysis_then_evaluates_and_exports(
    method, toy_npz, tmp_path, tiny_config):
  # The launcher with the information-retention analysis on (quickstart turns it on):
  # every method's quantizer is measured, then the run evaluates and exports.
  workdir = str(tmp_path / "run")
  c = tiny_config(toy_npz, num_train_steps=2, analysis_every_steps=1,
                  **{"model.binarize": method, "model.name": "resnet20"})
  final = train.train_and_evaluate(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    analyses = [r for r in map(json.loads, f) if r["split"] == "analysis"]
  assert [r["step"] for r in analyses] == [1, 2]
  errors = {k: v for k, v in analyses[-1].items() if k.startswith("quant_error/")}
  # (bnn's plain sign has no scale: its error grows as 1/mean|w|; the others are < 1.)
  assert len(errors) == 18 and all(0 < v < (1e3 if method == "bnn" else 1)
                                   for v in errors.values()), errors
  assert any(k.startswith("flip_ratio/") for k in analyses[-1])
  assert evaluate.evaluate_workdir(workdir)["test_loss"] == pytest.approx(final["test_loss"])
  report = export_workdir(workdir, str(tmp_path / "model.irnet"))
  # XOR/popcount against the float eval forward: equal up to float rounding.
  assert report["check_same_argmax"] and report["check_max_abs_diff"] < 1e-5, report
