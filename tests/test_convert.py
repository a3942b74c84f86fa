"""PyTorch interop: official key names, exact round trips, and a float64 reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irnet_jax import convert, layers, models, ops

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
    return jnp.mean(jnp.sum(jnp.square(m(x, ede=ede)), axis=-1))
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
  # dL/dba and dL/dbw of a cross-correlation, via its linearity (one-hot probes).
  d_ba = np.zeros_like(x)
  it = np.nditer(x, flags=["multi_index"])
  for _ in it:
    e = np.zeros_like(x)
    e[it.multi_index] = 1.0
    d_ba[it.multi_index] = np.sum(_np_conv_nchw(e, bw, stride, 1) * g)
  d_bw = np.zeros_like(w)
  it = np.nditer(w, flags=["multi_index"])
  for _ in it:
    e = np.zeros_like(w)
    e[it.multi_index] = 1.0
    d_bw[it.multi_index] = np.sum(_np_conv_nchw(ba, e, stride, 1) * g)
  ede_grad = lambda v: k * t * (1 - np.tanh(t * v) ** 2)
  dx = d_ba * ede_grad(x)
  u = (d_bw.reshape(o, -1) * sw) * ede_grad(w_std)  # dL/dw_std
  # w_std = c / s, s = std(c, ddof=1), c = w - mean(w): chain rule through s and mean.
  dc = u / s - (np.sum(u * c, 1, keepdims=True) / s ** 2) * (c - c.mean(1, keepdims=True)) / ((n - 1) * s)
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
    return jnp.sum(nnx.merge(graphdef, state)(xin, ede) * g_nhwc)

  out = conv(x_nhwc, ede)
  np.testing.assert_allclose(np.asarray(out).transpose(0, 3, 1, 2), ref_out, rtol=0, atol=1e-12)
  d_state, dx = jax.grad(loss, argnums=(0, 1))(state, x_nhwc)
  dw = d_state["kernel"][...]
  np.testing.assert_allclose(np.asarray(dx).transpose(0, 3, 1, 2), ref_dx, rtol=0, atol=1e-12)
  np.testing.assert_allclose(np.asarray(dw).transpose(3, 2, 0, 1), ref_dw, rtol=0, atol=1e-12)
