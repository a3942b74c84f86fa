"""PyTorch interop: official key names, exact round trips, and a float64 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irnet_jax import binarize, convert, layers, models, ops

ALL_MODELS = ["resnet20", "resnet20_1w32a", "resnet18_cifar", "vgg_small", "resnet18",
              "resnet34", "resnet18_1w32a"]


def _flat(state):
  return {k: np.asarray(v) for k, v in convert.to_torch_state_dict(state).items()}


@pytest.mark.parametrize("name", ALL_MODELS)
def test_round_trip_every_model_exactly(name):
  src = models.create(name, num_classes=10, rngs=nnx.Rngs(0))
  # Non-trivial BN statistics so that every leaf is checked.
  for path, var in nnx.iter_graph(src):
    if isinstance(var, nnx.BatchStat):
      var.set_value(var[...] + jnp.arange(var.size, dtype=var.dtype) / 7)
  sd = convert.to_torch_state_dict(nnx.state(src))
  dst = models.create(name, num_classes=10, rngs=nnx.Rngs(1))
  convert.load_torch_state_dict(dst, sd)
  a, b = _flat(nnx.state(src)), _flat(nnx.state(dst))
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_official_key_names_and_layouts():
  sd = convert.to_torch_state_dict(nnx.state(models.create("resnet20")))
  assert sd["layer2.0.conv1.weight"].shape == (32, 16, 3, 3)  # OIHW
  assert sd["linear.weight"].shape == (10, 64)  # (out, in)
  assert {"bn1.running_var", "bn1.num_batches_tracked", "bn2.running_mean",
          "linear.bias", "conv1.weight"} <= sd.keys()
  assert not any("shortcut" in k for k in sd)  # option A has no parameters
  sd18 = convert.to_torch_state_dict(nnx.state(models.create("resnet18")))
  assert sd18["fc.weight"].shape == (1000, 512)
  assert sd18["layer2.0.downsample.0.weight"].shape == (128, 64, 1, 1)
  assert "layer2.0.downsample.1.running_mean" in sd18 and "bn3.weight" in sd18
  sd_c18 = convert.to_torch_state_dict(nnx.state(models.create("resnet18_cifar")))
  assert sd_c18["layer2.0.shortcut.0.weight"].shape == (128, 64, 1, 1)
  sd_vgg = convert.to_torch_state_dict(nnx.state(models.create("vgg_small")))
  assert sd_vgg["fc.weight"].shape == (10, 8192) and "conv5.weight" in sd_vgg


def test_refuses_unknown_missing_and_misshaped_keys():
  model = models.create("resnet20")
  sd = convert.to_torch_state_dict(nnx.state(model))
  with pytest.raises(ValueError, match=r"unknown keys.*layer9\.0\.conv1\.weight"):
    convert.load_torch_state_dict(model, {**sd, "layer9.0.conv1.weight": np.zeros(1)})
  missing = dict(sd)
  del missing["layer1.0.bn1.running_var"]
  with pytest.raises(ValueError, match=r"missing keys.*layer1\.0\.bn1\.running_var"):
    convert.load_torch_state_dict(model, missing)
  with pytest.raises(ValueError, match=r"mis-shaped.*linear\.weight"):
    convert.load_torch_state_dict(model, {**sd, "linear.weight": np.zeros((10, 65))})
  before = convert.to_torch_state_dict(nnx.state(model))["conv1.weight"]
  np.testing.assert_array_equal(before, sd["conv1.weight"])  # nothing half-loaded


def _loss_and_grads(model, x, ede):
  def loss_fn(m):
    binarize.set_ede(m, ede)
    return jnp.mean(jnp.sum(jnp.square(m(x)), axis=-1))
  loss, grads = nnx.value_and_grad(loss_fn)(model)
  return loss, convert.to_torch_state_dict(grads)


def test_resnet20_float64_logits_and_grads_unchanged_by_round_trip(x64):
  rng = np.random.default_rng(0)
  src = models.create("resnet20", param_dtype=jnp.float64, rngs=nnx.Rngs(0))
  sd = convert.to_torch_state_dict(nnx.state(src))
  dst = models.create("resnet20", rngs=nnx.Rngs(5))  # float32 init, overwritten by float64
  convert.load_torch_state_dict(dst, sd)
  x = jnp.asarray(rng.normal(size=(4, 32, 32, 3)))
  ede = ops.EDE(jnp.float64(0.3), jnp.float64(3.3))
  for m in (src, dst):
    m.eval()
  np.testing.assert_array_equal(src(x), dst(x))
  assert dst(x).dtype == jnp.float64
  for m in (src, dst):
    m.train()
  (la, ga), (lb, gb) = _loss_and_grads(src, x, ede), _loss_and_grads(dst, x, ede)
  assert float(la) == float(lb)
  assert ga.keys() == gb.keys() and "layer3.2.conv2.weight" in ga
  for key in ga:
    np.testing.assert_array_equal(ga[key], gb[key], err_msg=key)


def _np_conv_nchw(x, w, stride, pad):
  """Direct NCHW/OIHW cross-correlation with zero padding (the F.conv2d definition)."""
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  n, _, h, wd = x.shape
  o, _, kh, kw = w.shape
  ho, wo = (h - kh) // stride + 1, (wd - kw) // stride + 1
  out = np.zeros((n, o, ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out


def _np_linear_grad(f, like, g):
  """dL/dv of L = sum(f(v) * g) for a linear ``f`` of arrays shaped like ``like``: f of
  one one-hot probe per entry."""
  grad = np.zeros_like(like)
  for index in np.ndindex(*like.shape):
    e = np.zeros_like(like)
    e[index] = 1.0
    grad[index] = np.sum(f(e) * g)
  return grad


def _np_irconv_reference(x, w, t, k, g, stride):
  """IRConv2d forward and backward written out by hand in NumPy (float64, torch layouts).

  Returns (out, dL/dx, dL/dw) for L = sum(out * g).
  """
  o = w.shape[0]
  flat = w.reshape(o, -1)
  n = flat.shape[1]
  c = flat - flat.mean(1, keepdims=True)
  s = c.std(1, ddof=1, keepdims=True)
  w_std = c / s
  sw = 2.0 ** np.round(np.log(np.abs(w_std).mean(1, keepdims=True)) / np.log(2))
  bw = (np.sign(w_std) * sw).reshape(w.shape)
  ba = np.sign(x)
  out = _np_conv_nchw(ba, bw, stride, 1)
  # dL/dba and dL/dbw of a cross-correlation, via its linearity in each operand.
  d_ba = _np_linear_grad(lambda e: _np_conv_nchw(e, bw, stride, 1), x, g)
  d_bw = _np_linear_grad(lambda e: _np_conv_nchw(ba, e, stride, 1), w, g)
  ede_grad = lambda v: k * t * (1 - np.tanh(t * v) ** 2)
  dx = d_ba * ede_grad(x)
  u = (d_bw.reshape(o, -1) * sw) * ede_grad(w_std)  # dL/dw_std
  # w_std = c / s, s = std(c, ddof=1), c = w - mean(w): chain rule through s and mean.
  centred = c - c.mean(1, keepdims=True)
  dc = u / s - (np.sum(u * c, 1, keepdims=True) / s ** 2) * centred / ((n - 1) * s)
  dw = dc - dc.mean(1, keepdims=True)
  return out, dx, dw.reshape(w.shape)


def test_irconv_matches_hand_written_float64_reference(x64):
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 3, 5, 5))
  w = rng.normal(0.1, 0.5, size=(4, 3, 3, 3))
  t, k = 0.7, 1.6
  conv = layers.BinaryConv(3, 4, 3, strides=2, padding=1, param_dtype=jnp.float64,
                           rngs=nnx.Rngs(0))
  conv.kernel[...] = jnp.asarray(w.transpose(2, 3, 1, 0))
  g = rng.normal(size=(2, 4, 3, 3))
  ref_out, ref_dx, ref_dw = _np_irconv_reference(x, w, t, k, g, stride=2)
  x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))
  g_nhwc = jnp.asarray(g.transpose(0, 2, 3, 1))
  ede = ops.EDE(jnp.float64(t), jnp.float64(k))

  graphdef, state = nnx.split(conv)

  def loss(state, xin):
    m = nnx.merge(graphdef, state)
    binarize.set_ede(m, ede)
    return jnp.sum(m(xin) * g_nhwc)

  binarize.set_ede(conv, ede)
  out = conv(x_nhwc)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref_out, rtol=0, atol=1e-12)
  d_state, dx = jax.grad(loss, argnums=(0, 1))(state, x_nhwc)
  dw = d_state["kernel"][...]
  np.testing.assert_allclose(np.asarray(dx).transpose(0, 3, 1, 2), ref_dx, rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(dw).transpose(3, 2, 0, 1), ref_dw, rtol=0, atol=1e-12)


def _perturbed(name, num_classes=10, seed=0):
  model = models.create(name, num_classes=num_classes, rngs=nnx.Rngs(seed))
  for _, var in nnx.iter_graph(model):
    if isinstance(var, nnx.BatchStat):
      var.set_value(var[...] + jnp.arange(var.size, dtype=var.dtype) / 7 + 0.5)
  return model


def test_official_checkpoint_dicts_load():
  # The official trainers: torch.save({'state_dict': DataParallel(model).state_dict(),
  # 'best_prec1': ...}); other tools use a 'model' entry; DDP also prefixes 'module.'.
  sd = convert.to_torch_state_dict(nnx.state(_perturbed("resnet20")))
  wrapped = {"module." + k: v for k, v in sd.items()}
  for obj in ({"state_dict": wrapped, "best_prec1": np.float64(91.25), "epoch": 399},
              {"model": sd, "optimizer": {"lr": 0.1}}, wrapped, sd):
    unwrapped, extras = convert.official_state_dict(obj)
    assert unwrapped.keys() == sd.keys()
    dst = models.create("resnet20", rngs=nnx.Rngs(3))
    convert.load_torch_state_dict(dst, obj)
    got = convert.to_torch_state_dict(nnx.state(dst))
    for key in sd:
      np.testing.assert_array_equal(got[key], sd[key], err_msg=key)
  assert convert.official_state_dict(
      {"state_dict": wrapped, "best_prec1": np.float64(91.25), "epoch": 399})[1] == {
          "best_prec1": 91.25, "epoch": 399}
  # One prefix only, and only when every key has it: a half-prefixed dict is refused.
  half = dict(sd, **{"module.linear.bias": sd["linear.bias"]})
  del half["linear.bias"]
  with pytest.raises(ValueError, match=r"unknown keys.*module\.linear\.bias"):
    convert.load_torch_state_dict(models.create("resnet20"), half)


def test_imported_workdir_evaluates_exports_and_fine_tunes(tmp_path, toy_npz, tiny_config):
  import json
  import os

  from irnet_jax import evaluate, report, run_record, steps, train
  from irnet_jax.convert import workdir as workdir_lib

  npz = toy_npz
  src = _perturbed("resnet20", num_classes=4)
  sd = convert.to_torch_state_dict(nnx.state(src))
  obj = {"state_dict": {"module." + k: v for k, v in sd.items()}, "best_prec1": 77.5}
  w = str(tmp_path / "imported")
  meta = workdir_lib.import_state_dict(obj, tiny_config(npz, num_train_steps=2), w,
                                       source="model.th")
  assert meta["imported"].endswith("model.th") and meta["official"] == {"best_prec1": 77.5}
  assert run_record.load_config(w).model.num_classes == 4  # From linear.weight.
  with pytest.raises(ValueError, match="already holds a run"):
    workdir_lib.import_state_dict(obj, tiny_config(npz), w)
  # Round trip out: exactly the weights that went in.
  back = workdir_lib.export_state_dict(w)
  assert back.keys() == sd.keys()
  for key in sd:
    np.testing.assert_array_equal(back[key], sd[key], err_msg=key)
  # evaluate: the same numbers as the model computes on the (normalized) test images.
  result = evaluate.evaluate_workdir(w)
  with np.load(npz) as f:
    x, y = f["x_test"], f["y_test"]
  c = tiny_config(npz)
  mean, std = np.asarray(c.dataset.mean), np.asarray(c.dataset.std)
  src.eval()
  logits = np.asarray(src(jnp.asarray((x / 255.0 - mean) / std, jnp.float32)))
  assert result["test_examples"] == len(y) == 21
  assert result["test_accuracy"] == np.mean(logits.argmax(-1) == y)
  np.testing.assert_allclose(result["test_loss"],
                             float(steps.cross_entropy(jnp.asarray(logits), y).mean()),
                             rtol=1e-5)
  assert json.load(open(os.path.join(w, "eval_metrics.json")))["step"] == 0
  text = report.write_report(w).read_text()
  assert "eval_metrics.json" in text and "| test_examples | 21 |" in text
  # Fine-tuning: init_from in a new workdir and training W itself start from the same
  # imported weights with a fresh optimizer, so they end identical; from scratch differs.
  tuned = train.train_and_evaluate(tiny_config(npz, num_train_steps=2, init_from=w),
                                   str(tmp_path / "tuned"))
  cont = train.train_and_evaluate(tiny_config(npz, num_train_steps=2), w)
  scratch = train.train_and_evaluate(tiny_config(npz, num_train_steps=2),
                                     str(tmp_path / "scratch"))
  assert tuned["params_fingerprint"] == cont["params_fingerprint"]
  assert scratch["params_fingerprint"] != cont["params_fingerprint"]


@pytest.mark.slow
def test_official_trainer_file_converts_evaluates_exports_and_round_trips(tmp_path):
  """Acceptance: a model.th saved the official trainer's way, through the commands."""
  torch = pytest.importorskip("torch")
  import importlib.util
  import json
  import os
  import subprocess
  import sys

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "torch_reference", os.path.join(repo, "experiments", "torch_reference.py"))
  ref = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(ref)
  torch.manual_seed(0)
  official = ref.MODELS["resnet20"](10)
  ref.randomize_bn(official, torch.Generator().manual_seed(1))  # Non-trivial BN stats.
  official.eval()
  path = str(tmp_path / "model.th")
  torch.save({"state_dict": torch.nn.DataParallel(official).state_dict(),
              "best_prec1": 91.5}, path)

  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
  y = rng.integers(0, 10, 64).astype(np.int32)
  npz = str(tmp_path / "test.npz")
  np.savez(npz, x_train=x[:16], y_train=y[:16], x_test=x, y_test=y)

  def run(*args):
    out = subprocess.run([sys.executable, "-m", *args], cwd=repo, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout

  w = str(tmp_path / "w")
  run("irnet_jax.convert", f"--torch={path}", "--config=cifar10_resnet20",
      f"--workdir={w}")
  run("irnet_jax.evaluate", f"--workdir={w}", "--config.dataset.name=npz",
      f"--config.dataset.path={npz}")
  got = json.load(open(os.path.join(w, "eval_metrics.json")))

  # The official model in PyTorch on the same images, normalized the same way.
  mean, std = np.array((0.485, 0.456, 0.406)), np.array((0.229, 0.224, 0.225))  # The config's.
  xt = torch.from_numpy(((x / 255.0 - mean) / std).transpose(0, 3, 1, 2)).float()
  with torch.no_grad():
    logits = official(xt)
  loss = float(torch.nn.functional.cross_entropy(logits, torch.from_numpy(y).long()))
  accuracy = float((logits.argmax(-1).numpy() == y).mean())
  print(f"official torch: accuracy={accuracy} loss={loss}; irnet_jax.evaluate: {got}")
  assert got["test_examples"] == 64 and got["step"] == 0
  assert got["test_accuracy"] == accuracy
  np.testing.assert_allclose(got["test_loss"], loss, rtol=1e-4)

  report = json.loads(run("irnet_jax.export", f"--workdir={w}",
                          f"--out={tmp_path / 'model.irnet'}").strip().splitlines()[-1])
  assert report["check_same_argmax"] and report["check_max_abs_diff"] < 1e-3

  out = str(tmp_path / "back.pth")
  run("irnet_jax.convert", f"--workdir={w}", f"--to_torch={out}")
  back = ref.MODELS["resnet20"](10)
  back.load_state_dict(torch.load(out, weights_only=True), strict=True)
  back.eval()
  with torch.no_grad():
    assert torch.equal(back(xt), logits)


def test_convert_without_torch_says_so(tmp_path):
  import os
  import subprocess
  import sys
  code = ("import runpy, sys; sys.modules['torch'] = None; "
          f"sys.argv = ['convert', '--workdir={tmp_path}', '--to_torch=x.pth']; "
          "runpy.run_module('irnet_jax.convert', run_name='__main__')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert out.returncode != 0 and "needs torch: pip install torch" in out.stderr
  assert "Traceback" not in out.stderr
