"""binarize_model, set_progress, BinaryDense and the launcher on a user's own network.

``SmallCNN`` below is "the user's network": plain nnx.Conv / nnx.BatchNorm / nnx.Linear,
defined here and not in the package; the launcher reaches it as
``--config.model.name=test_binarize:small_cnn`` with this directory on PYTHONPATH.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irnet_jax import binarize, checkpointing, export, layers, models

TESTS = os.path.dirname(os.path.abspath(__file__))


class SmallCNN(nnx.Module):
  """conv-relu-bn x3 with a max pool, global average pool, two dense layers.

  BatchNorm after the ReLU, so that what a binary layer's sign sees is centred: after a
  ReLU it would only tell 0 from positive (and the mean-pooled input of ``hidden`` would
  binarize to all ones)."""

  def __init__(self, *, num_classes: int = 10, width: int = 16, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, width, (3, 3), padding=1, rngs=rngs)
    self.bn0 = nnx.BatchNorm(width, rngs=rngs)
    self.conv1 = nnx.Conv(width, 2 * width, (3, 3), padding="SAME", rngs=rngs)
    self.bn1 = nnx.BatchNorm(2 * width, rngs=rngs)
    self.conv2 = nnx.Conv(2 * width, 2 * width, (3, 3), padding=1, rngs=rngs)
    self.bn2 = nnx.BatchNorm(2 * width, rngs=rngs)
    self.hidden = nnx.Linear(2 * width, 32, rngs=rngs)
    self.bn3 = nnx.BatchNorm(32, rngs=rngs)
    self.head = nnx.Linear(32, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.bn0(jax.nn.relu(self.stem(x)))
    x = self.bn1(jax.nn.relu(self.conv1(x)))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    x = self.bn2(jax.nn.relu(self.conv2(x)))
    x = jnp.mean(x, axis=(1, 2))
    return self.head(self.bn3(jax.nn.relu(self.hidden(x))))


def small_cnn(*, rngs: nnx.Rngs, num_classes: int = 10, width: int = 16) -> SmallCNN:
  """The factory the launcher calls (rngs and the config's model arguments)."""
  return SmallCNN(num_classes=num_classes, width=width, rngs=rngs)


# --- binarize_model -----------------------------------------------------------------


def test_report_keeps_first_conv_and_last_linear():
  model, report = binarize.binarize_model(small_cnn(rngs=nnx.Rngs(0)), "irnet")
  assert report.kept == ["stem", "head"]
  assert report.binary == ["conv1", "conv2", "hidden"]
  assert isinstance(model.conv1, layers.BinaryConv) and model.conv1.padding == 1
  assert isinstance(model.hidden, layers.BinaryDense)
  assert isinstance(model.stem, nnx.Conv) and isinstance(model.head, nnx.Linear)
  text = str(report)
  assert "first conv" in text and "last linear" in text and "hidden" in text


def test_same_parameters_and_keep():
  float_model = small_cnn(rngs=nnx.Rngs(0))
  kernel, bias = float_model.conv1.kernel[...], float_model.conv1.bias[...]
  model, report = binarize.binarize_model(float_model, "bnn", keep=["hidden"])
  np.testing.assert_array_equal(model.conv1.kernel[...], kernel)
  np.testing.assert_array_equal(model.conv1.bias[...], bias)
  assert report.kept == ["stem", "hidden", "head"]
  _, report = binarize.binarize_model(small_cnn(rngs=nnx.Rngs(0)), "bnn",
                                      keep=lambda path, m: isinstance(m, nnx.Linear))
  assert report.binary == ["conv1", "conv2"]


def test_asymmetric_padding_is_kept_with_the_reason():
  class Strided(nnx.Module):
    def __init__(self, rngs):
      self.a = nnx.Conv(3, 8, (3, 3), rngs=rngs)
      self.b = nnx.Conv(8, 8, (3, 3), strides=2, padding="SAME", rngs=rngs)
      self.c = nnx.Linear(8, 2, rngs=rngs)

  _, report = binarize.binarize_model(Strided(nnx.Rngs(0)), "irnet")
  row = next(r for r in report.rows if r.path == "b")
  assert row.action == "kept" and "asymmetric" in row.why


@pytest.mark.parametrize("name,size", [("resnet20", 8), ("resnet18_cifar", 8),
                                       ("vgg_small", 32), ("resnet18", 32)])
def test_registry_float_twin_binarized_equals_registry_binary(x64, name, size):
  # The same IR-Net, not a second one: forward and every gradient equal, float64.
  kw = dict(num_classes=10, conv_impl="xla", param_dtype=jnp.float64)
  ref = models.create(name, rngs=nnx.Rngs(1), **kw)
  twin, _ = binarize.binarize_model(
      models.create(name, rngs=nnx.Rngs(1), weight_bits=32, act_bits=32, **kw), "irnet")
  assert jax.tree.structure(nnx.state(ref)) == jax.tree.structure(nnx.state(twin))
  x = jax.random.normal(jax.random.key(0), (4, size, size, 3), jnp.float64)

  # Compiled whole (one program per model), not op by op: 4x faster, and still exact.
  @nnx.jit
  @nnx.value_and_grad
  def loss(m):
    return jnp.sum(jnp.sin(m(x)))

  for m in (ref, twin):
    binarize.set_progress(m, 0.3)
  (loss_ref, grads_ref), (loss_twin, grads_twin) = loss(ref), loss(twin)
  assert float(loss_ref) == float(loss_twin)
  for a, b in zip(jax.tree.leaves(grads_ref), jax.tree.leaves(grads_twin)):
    np.testing.assert_array_equal(a, b)


def test_set_progress_reaches_every_ede_layer_and_changes_gradients():
  model, _ = binarize.binarize_model(small_cnn(rngs=nnx.Rngs(0)), "irnet")
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))

  def grads(p):
    ede = binarize.set_progress(model, p, 0.1, 10.0)
    return ede, nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)

  ede, g0 = grads(0.0)
  assert float(ede.t) == pytest.approx(0.1) and float(ede.k) == pytest.approx(10.0)
  for layer in binarize.binary_layers(model).values():
    assert float(layer.ede_t[...]) == pytest.approx(0.1)
  _, g1 = grads(1.0)
  assert float(model.hidden.ede_t[...]) == pytest.approx(10.0)
  assert not np.allclose(g0.conv1.kernel[...], g1.conv1.kernel[...])


def test_unknown_method_lists_the_methods():
  with pytest.raises(ValueError, match="bireal"):
    binarize.binarize_model(small_cnn(rngs=nnx.Rngs(0)), "dorefa")


# --- the launcher on the user's network ---------------------------------------------


def _run(args, tmp_path):
  env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-m", *args], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_launcher_trains_evaluates_summarizes_and_exports_a_users_network(tmp_path):
  workdir = tmp_path / "run"
  model_flags = ["--config.model.name=test_binarize:small_cnn",
                 "--config.model.binarize=irnet"]
  out = _run(["irnet_jax.main", "--config=quickstart", f"--workdir={workdir}", *model_flags,
              "--config.num_epochs=14", "--config.analysis_every_steps=0",
              "--config.progress_bar=False"], tmp_path)  # 14 x 22 = 308 steps
  final = [json.loads(line) for line in open(workdir / "metrics.jsonl")
           if '"test"' in line][-1]
  assert final["step"] == 308 and final["accuracy"] > 0.5, final
  assert "accuracy" in out
  _run(["irnet_jax.evaluate", f"--workdir={workdir}"], tmp_path)
  evaluated = json.loads((workdir / "eval_metrics.json").read_text())
  assert evaluated["test_accuracy"] == pytest.approx(final["accuracy"])
  table = _run(["irnet_jax.summary", f"--workdir={workdir}"], tmp_path)
  assert "Dense (binary)" in table and "Conv3x3 (binary)" in table
  packed_file = tmp_path / "model.irnet"
  report = _run(["irnet_jax.export", f"--workdir={workdir}", f"--out={packed_file}"], tmp_path)
  assert ": 2 binary convs, 1 binary dense layer" in report  # conv1, conv2; hidden
  # The packed file's logits are the trained model's eval logits.
  model, _ = checkpointing.load_model(str(workdir))
  x = jax.random.normal(jax.random.key(2), (8, 16, 16, 3))
  np.testing.assert_array_equal(export.infer(export.load(str(packed_file)), x), model(x))
