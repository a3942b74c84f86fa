"""irnet_jax.summary: the model summary (parameters, MACs binary and float, output shapes,
memory) of registry models and of flax layers in containers, and its CLI's defaults."""
import os
import subprocess
import sys

from flax import nnx

import irnet_jax
from irnet_jax import config as config_lib
from irnet_jax import models
from irnet_jax import summary as summary_lib


def test_summary_resnet20_counts():
  resnet20 = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))
  s = irnet_jax.summary.summary(resnet20, (1, 32, 32, 3))
  assert s.params == 269_850
  row = s.row("layer1.0.conv1")
  assert row.output_shape == (1, 32, 32, 16)
  assert row.macs_binary == 32 * 32 * 3 * 3 * 16 * 16 and row.macs_float == 0
  assert row.params_1bit == 3 * 3 * 16 * 16
  assert s.row("conv1").macs_float == 32 * 32 * 3 * 3 * 3 * 16
  assert s.row("linear").macs_float == 64 * 10
  # Every binary 3x3 conv: 6 at 32x32x16, then stride-2 first convs, etc.
  assert s.macs_binary == sum(r.macs_binary for r in s.rows)
  assert 0.98 < s.binary_mac_share < 1.0
  assert s.memory_packed < s.memory_float32 / 10
  text = summary_lib.format_summary(s)
  assert "layer1.0.conv1" in text and "269,850" in text
  assert irnet_jax.model_summary is summary_lib.summary


def test_summary_of_flax_layers_in_containers():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.features = nnx.Sequential(nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs),
                                     nnx.BatchNorm(8, rngs=rngs), nnx.relu)
      self.heads = nnx.Dict(a=nnx.Linear(8, 4, rngs=rngs), unused=nnx.Linear(8, 2, rngs=rngs))

    def __call__(self, x):
      return self.heads["a"](self.features(x).mean(axis=(1, 2)))

  model = Net(nnx.Rngs(0))
  s = summary_lib.summary(model, (2, 16, 16, 3))
  assert [r.name for r in s.rows] == ["features.layers.0", "features.layers.1", "heads.a",
                                      "heads.unused"]
  assert s.row("features.layers.0").output_shape == (2, 8, 8, 8)
  assert s.row("features.layers.0").macs_float == 8 * 8 * 3 * 3 * 3 * 8
  assert s.row("heads.a").output_shape == (2, 4)
  assert s.row("heads.unused").output_shape is None
  assert isinstance(model.features.layers[0], nnx.Conv)  # the model is left alone


def test_summary_1w32a_has_no_binary_macs():
  # Abstract model (nnx.eval_shape): the summary only needs shapes.
  model = nnx.eval_shape(lambda: models.create("resnet20", num_classes=10, act_bits=32))
  s = summary_lib.summary(model)
  assert s.macs_binary == 0 and s.params_1bit == 267_264


def test_summary_cli_resolves_config_defaults():
  c = config_lib.base_config()  # num_classes -1 ("from the dataset"), structure "".
  name, kw, image_size = summary_lib._config_kwargs(c)
  assert name == "resnet20" and image_size == 32
  assert kw["num_classes"] == 10 and "structure" not in kw


def test_summary_lists_binary_dense_layers():
  class Mlp(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(3, 8, (3, 3), padding=1, rngs=rngs)
      self.hidden = nnx.Linear(8, 6, rngs=rngs)
      self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
      return self.head(self.hidden(self.conv(x).mean(axis=(1, 2))))

  model, _ = irnet_jax.binarize_model(Mlp(nnx.Rngs(0)), "irnet")
  s = summary_lib.summary(model, (2, 8, 8, 3))
  dense = s.row("hidden")
  assert (dense.kind, dense.bits, dense.output_shape) == ("Dense (binary)", "1/1", (2, 6))
  # 1-bit kernel (8 x 6), float bias; 48 XNOR/popcount MACs per image.
  assert (dense.params_1bit, dense.params_32bit, dense.macs_binary, dense.macs_float) == (
      48, 6, 48, 0)
  assert s.row("head").kind == "Dense" and s.row("head").macs_float == 12
  assert "Dense (binary)" in summary_lib.format_summary(s)


def test_grouped_and_depthwise_convs_count_one_mac_per_kernel_entry():
  class Net(nnx.Module):
    def __init__(self, rngs):
      self.depthwise = nnx.Conv(64, 64, (3, 3), feature_group_count=64, padding=1, rngs=rngs)
      self.grouped = nnx.Conv(64, 32, (1, 3), feature_group_count=4, padding=0, rngs=rngs)

    def __call__(self, x):
      return self.grouped(self.depthwise(x))

  s = summary_lib.summary(Net(nnx.Rngs(0)), (1, 8, 8, 64))
  # By hand: 8 x 8 outputs x 64 channels x 3 x 3 taps of one input channel each.
  assert s.row("depthwise").macs_float == 8 * 8 * 64 * 9 == 36_864
  # 8 x 6 outputs x 32 channels x (1 x 3 taps of 64 / 4 = 16 input channels).
  assert s.row("grouped").macs_float == 8 * 6 * 32 * 3 * 16


def test_a_factorys_own_arguments_come_from_config_model_kwargs_flags(tmp_path):
  # --config.model.kwargs.NAME=VALUE: a free-form section (the factory's arguments),
  # which ml_collections' overrides of existing fields cannot reach.
  tests = os.path.dirname(os.path.abspath(__file__))
  out = subprocess.run(
      [sys.executable, "-m", "irnet_jax.summary", "--config=quickstart",
       "--config.model.name=test_binarize:small_cnn", "--config.model.binarize=irnet",
       "--config.model.kwargs.width=8"], cwd=tmp_path, capture_output=True, text=True,
      timeout=120, env=dict(os.environ, PYTHONPATH=tests))
  assert out.returncode == 0, out.stderr[-2000:]
  conv1 = next(line for line in out.stdout.splitlines() if line.startswith("conv1 "))
  assert "1,152" in conv1  # 3x3x8x16 binary weights at width 8 (4,608 at the default 16).
