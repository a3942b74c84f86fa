"""irnet_jax.export: bit packing, XOR-popcount inference, the file format."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irnet_jax import binarize, export, layers, methods, models, ops
from irnet_jax.export import format as fmt
from irnet_jax.export.infer import apply_instruction
from irnet_jax.export.pack import float32_param_bytes, pack_layer

# Every registry model and two full-precision twins (other variants: single-conv tests).
CASES = [(name, {}) for name in models.REGISTRY] + [
    ("resnet20", {"weight_bits": 32, "act_bits": 32}),
    ("resnet18", {"weight_bits": 32, "act_bits": 32}),
]


def _images(n=2, size=32, seed=1):
  return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def _zero_weights(model):
  """Output channel 0 of the first binary conv gets exact zeros after standardization:
  a {-1, 0, +1} pattern with as many -1 as +1 has mean exactly 0, so its zeros stay 0."""
  conv = next((m for _, m in nnx.iter_graph(model)
               if isinstance(m, layers.BinaryConv) and m.binary_weights), None)
  if conv is None:
    return
  k = conv.kernel[...]
  n = k[..., 0].size
  pattern = np.zeros(n, np.float32)
  pattern[: n // 3], pattern[n // 3: 2 * (n // 3)] = 1.0, -1.0
  pattern = np.random.default_rng(0).permutation(pattern).reshape(k.shape[:-1])
  conv.kernel[...] = k.at[..., 0].set(pattern)


@nnx.jit
def _train_forward(model, x):
  return model(x)


def _randomize_bn(model, x, seed=0):
  """Non-trivial eval-mode BN: random gamma (either sign) and beta, running stats from
  a train-mode pass (so activations stay O(1)), then perturbed. Channels 0 and 1 get
  gamma = beta = 0: exact-zero activations, i.e. sign(0) = 0 inputs downstream."""
  rng = np.random.default_rng(seed)
  bns = [m for _, m in nnx.iter_graph(model) if isinstance(m, layers.BatchNorm)]
  for bn in bns:
    c = bn.scale.shape[0]
    gamma = rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)
    beta = rng.normal(0.0, 0.3, c)
    gamma[:2] = beta[:2] = 0.0
    bn.scale[...] = jnp.asarray(gamma, jnp.float32)
    bn.bias[...] = jnp.asarray(beta, jnp.float32)
    bn.momentum = 1.0  # the running stats become the batch stats
  model.train()
  _train_forward(model, x)
  model.eval()
  for bn in bns:
    c = bn.scale.shape[0]
    sd = np.sqrt(np.asarray(bn.var[...]))
    bn.mean[...] = bn.mean[...] + jnp.asarray(0.2 * sd * rng.normal(size=c), jnp.float32)
    bn.var[...] = bn.var[...] * jnp.asarray(rng.uniform(0.7, 1.4, c), jnp.float32)
    bn.momentum = 0.1


def _create(name, kw, seed=0, num_classes=10):
  """``models.create(name, **kw)`` with numpy-drawn He-normal kernels: skips compiling
  a jax.random initializer per parameter shape, which dominated this file's runtime."""
  abstract = nnx.eval_shape(lambda: models.create(name, num_classes=num_classes, **kw))
  graphdef, state = nnx.split(abstract)
  rng = np.random.default_rng(seed)

  def init(path, v):
    # The variable's name: the last dict key (paths may end in ".value").
    leaf = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    if leaf == "kernel":
      std = np.sqrt(2.0 / np.prod(v.shape[:-1]))
      return jnp.asarray(rng.normal(0.0, std, v.shape), v.dtype)
    return (jnp.ones if leaf in ("scale", "var") else jnp.zeros)(v.shape, v.dtype)

  return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(init, state))


def _model(name, kw, x):
  model = _create(name, kw)
  _zero_weights(model)
  _randomize_bn(model, jnp.concatenate([x, _images(6, x.shape[1], seed=2)]))
  return model


@pytest.fixture(scope="module")
def resnet20():
  x = _images()
  return _model("resnet20", {}, x), x


def _binary_convs(model):
  return {".".join(map(str, path)): m for path, m in nnx.iter_graph(model)
          if isinstance(m, layers.BinaryConv)}


# --- bits and the dot product ------------------------------------------------------


def _np_pack(bits):
  """Reference packing: numpy's little-endian bit order, bytes viewed as little-endian
  uint32 -- the documented layout (element k: word k // 32, bit k % 32)."""
  bits = np.asarray(bits, bool)
  k = bits.shape[-1]
  pad = np.zeros(bits.shape[:-1] + (-k % 32,), bool)
  b = np.packbits(np.concatenate([bits, pad], -1), axis=-1, bitorder="little")
  return np.ascontiguousarray(b).view("<u4")


_dot = jax.jit(export.popcount_dot)


@pytest.mark.parametrize("n", [1, 7, 32, 45, 100, 300])
def test_popcount_dot_equals_float_dot(n):
  rng = np.random.default_rng(n)
  a = rng.choice([-1.0, 0.0, 1.0], size=(5, n), p=[0.45, 0.1, 0.45])
  w = rng.choice([-1.0, 1.0], size=(3, n))
  # +-1 vectors: a.w = n - 2 popcount(a XOR w).
  pm = np.where(a < 0, -1.0, 1.0)
  ones = _np_pack(np.ones_like(pm, bool))
  np.testing.assert_array_equal(_dot(_np_pack(pm < 0), ones, _np_pack(w < 0)), pm @ w.T)
  # Zero activations (mask plane), then zero weights as well (weight mask).
  np.testing.assert_array_equal(_dot(_np_pack(a < 0), _np_pack(a != 0), _np_pack(w < 0)),
                                a @ w.T)
  w[:, ::3] = 0.0
  dot = _dot(_np_pack(a < 0), _np_pack(a != 0), _np_pack(w < 0), _np_pack(w != 0))
  assert dot.dtype == jnp.int32
  np.testing.assert_array_equal(dot, a @ w.T)


def test_bn_is_bitwise_the_models_eager_bn():
  # Guards the FMA-contraction workaround in infer._bn (see the comment there).
  bn = layers.BatchNorm(16, use_running_average=True)
  rng = np.random.default_rng(0)
  for field, v in [("mean", rng.normal(size=16)), ("var", rng.uniform(0.1, 3, 16)),
                   ("scale", rng.normal(size=16)), ("bias", rng.normal(size=16))]:
    getattr(bn, field)[...] = jnp.asarray(v, jnp.float32)
  x = jnp.asarray(rng.normal(size=(4, 6, 6, 16)), jnp.float32)
  ins, p = pack_layer(bn, "bn")
  fused = jax.jit(
      lambda p, x: jnp.clip(apply_instruction(ins, p, x) + x, -1, 1))(p, x)
  np.testing.assert_array_equal(fused, jnp.clip(bn(x) + x, -1, 1))


# --- pack / unpack -----------------------------------------------------------------


def test_pack_unpack_round_trip(resnet20):
  model, _ = resnet20
  packed = export.pack(model, name="resnet20", kwargs={})
  kernels = export.unpack(packed)
  convs = _binary_convs(model)
  assert set(kernels) == set(convs)
  for path, conv in convs.items():
    np.testing.assert_array_equal(kernels[path], np.asarray(conv.quantized_kernel()),
                                  err_msg=path)
  binary = packed.binary_layers()
  assert len(binary) == 18
  first = next(i for i in packed.program if i["op"] == "conv" and i["binary_weights"])
  assert first["has_zeros"] and f"{first['name']}/nonzero" in packed.arrays
  # Bits of the standardized kernel, exponents of the Libra-PB scale.
  conv = convs["layer2.0.conv2"]
  w_std = np.asarray(conv.kernel[...]).reshape(-1, conv.out_features)
  w_std = (w_std - w_std.mean(0)) / w_std.std(0, ddof=1)
  np.testing.assert_array_equal(
      export.unpack_bits(packed.arrays["layer2.0.conv2/sign"], w_std.shape[0]), w_std.T < 0)
  e = np.round(np.log2(np.abs(w_std).mean(0)))
  np.testing.assert_array_equal(packed.arrays["layer2.0.conv2/exp"], e.astype(np.int8))


def test_pack_traces_the_forward_and_leaves_the_model_alone():
  model = _create("resnet20", {})
  model.train()
  conv1 = model.conv1
  packed = export.pack(model, name="resnet20")
  # The copy was probed and put in eval mode, not the model.
  assert model.conv1 is conv1 and not model.bn1.use_running_average
  ops_used = {i["op"] for i in packed.program}
  assert ops_used == {"conv", "bn", "act", "add", "slice", "pad", "mean", "linear"}
  assert packed.meta["input_shape"] == [32, 32, 3] and packed.meta["num_classes"] == 10
  # Layers are named by module path; the option-A shortcut is its slice and pad.
  names = [i["name"] for i in packed.program if "name" in i]
  assert names[:3] == ["conv1", "bn1", "layer1.0.conv1"] and names[-1] == "linear"
  pad = next(i for i in packed.program if i["op"] == "pad")
  assert pad["padding_config"][-1] == [8, 8, 0]


class _WithCumsum(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs)

  def __call__(self, x):
    x = jnp.cumsum(self.conv(x), axis=-1)  # no packed instruction for this
    return self.head(x.mean(axis=(1, 2)))


def test_pack_names_an_unsupported_operation():
  model = _WithCumsum(nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"_WithCumsum: its forward uses `cumsum` on "
                     r"\(float32\[2,8,8,4\]\) \(after layer 'conv', at .*test_export.py"):
    export.pack(model, input_shape=(8, 8, 3))
  # A model that cannot run on the guessed input shape says so.
  with pytest.raises(ValueError, match="input_shape"):
    export.pack(nnx.Linear(5, 2, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match=r"cannot trace Linear on inputs of shape \(N, 7\)"):
    export.pack(nnx.Linear(5, 2, rngs=nnx.Rngs(0)), input_shape=(7,))
  # The library's binary layers in a form the program cannot hold: named.
  conv = layers.BinaryConv(4, 4, 3, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  model = nnx.Sequential(nnx.Conv(3, 4, (3, 3), padding=1, rngs=nnx.Rngs(0)), conv)
  with pytest.raises(ValueError, match=r"layers\.1: pack\(\) supports float32 compute only"):
    export.pack(model, input_shape=(8, 8, 3))


def test_pack_rejects_non_finite_kernel():
  model = _create("resnet20", {})
  conv = model.layer1[0].conv1
  conv.kernel[...] = conv.kernel[...].at[..., 3].set(0.5)  # constant channel: std 0
  with pytest.raises(ValueError, match="not finite"):
    export.pack(model)


# --- inference ---------------------------------------------------------------------


@pytest.mark.parametrize("name,kw", CASES)
def test_infer_matches_eval_forward(name, kw):
  x = _images()
  model = _model(name, kw, x)
  ref = model(x)  # eval mode, running statistics
  packed = export.pack(model, name=name, kwargs=kw)
  out = export.infer(packed, x, mode="layers")
  assert out.shape == ref.shape == (2, 10)
  assert float(jnp.abs(ref).max()) < 100  # logits O(1..10): 1e-4 is a tight bound
  np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)


def test_infer_whole_program_jit_matches(resnet20):
  # The default mode: the whole network as one XLA computation.
  model, x = resnet20
  ref = model(x)
  packed = export.pack(model)
  out = export.infer(packed, x)
  np.testing.assert_array_equal(out.argmax(-1), ref.argmax(-1))
  np.testing.assert_allclose(out, ref, rtol=0, atol=1e-4)
  np.testing.assert_array_equal(out, export.infer(packed, x, mode="layers"))


@pytest.mark.parametrize("stride,pad,kw", [
    (1, 1, {}), (2, 1, {}), (2, 0, {}),  # XOR-popcount path
    (1, 1, {"weight_quantizer": "sign"}),  # binary weights without Libra-PB scale
    (2, 1, {"weight_bits": 32}),  # float weights, binary activations
    (1, 1, {"act_bits": 32}),  # 1w32a: float conv with the +-2^e kernel
])
def test_single_conv_exact_with_zeros_and_padding(stride, pad, kw):
  # Inputs with many exact zeros (sign(0) = 0) and zero weights, checked bit for bit
  # against BinaryConv, including the zero-padded borders.
  rng = np.random.default_rng(stride)
  x = rng.normal(size=(2, 9, 9, 40)) * (rng.random((2, 9, 9, 40)) < 0.7)
  conv = nnx.eval_shape(lambda: layers.BinaryConv(40, 24, 3, strides=stride, padding=pad,
                                                  rngs=nnx.Rngs(0), **kw))
  kernel = rng.normal(size=(3, 3, 40, 24))
  kernel[..., 1:][rng.random((3, 3, 40, 23)) < 0.05] = 0.0  # zeros for "sign"
  # Channel 0: 120 each of -1, 0, +1, mean exactly 0: Libra-PB zeros as well.
  kernel[..., 0] = rng.permutation(np.repeat([-1.0, 0.0, 1.0], 120)).reshape(3, 3, 40)
  conv.kernel = nnx.Param(jnp.asarray(kernel, jnp.float32))
  binarize.set_ede(conv, ops.DEFAULT_EDE)  # The abstract layer's (t, k).
  x = jnp.asarray(x, jnp.float32)
  ins, p = pack_layer(conv, "c")
  assert ins["has_zeros"] == ins["binary_weights"]
  np.testing.assert_array_equal(jax.jit(lambda p, x: apply_instruction(ins, p, x))(p, x),
                                conv(x))


@pytest.mark.parametrize("quantizer", ["libra_pb", "sign", "mean_abs"])
def test_single_dense_with_method_parameters(quantizer):
  # BinaryDense with zeros in inputs and weights, a bias, RSign thresholds and RPReLU,
  # on (..., in) inputs with K = 45 (a partial last word).
  rng = np.random.default_rng(0)
  dense = layers.BinaryDense(45, 24, weight_quantizer=quantizer, estimator="ste",
                             act_threshold=True, rprelu=True, rngs=nnx.Rngs(0))
  kernel = rng.normal(size=(45, 24))
  kernel[rng.random((45, 24)) < 0.05] = 0.0
  kernel[:, 0] = np.repeat([-1.0, 0.0, 1.0], 15)  # Libra-PB zeros: mean exactly 0
  dense.kernel[...] = jnp.asarray(kernel, jnp.float32)
  dense.bias[...] = jnp.asarray(rng.normal(size=24), jnp.float32)
  dense.act_shift[...] = jnp.asarray(rng.normal(0, 0.3, 45) * (rng.random(45) < 0.7),
                                     jnp.float32)
  for k in ("shift_in", "slope", "shift_out"):
    dense.rprelu[k][...] = jnp.asarray(rng.normal(size=24), jnp.float32)
  x = rng.normal(size=(2, 3, 45)) * (rng.random((2, 3, 45)) < 0.7)
  x = jnp.asarray(x, jnp.float32) + dense.act_shift[...]  # exact zeros after the shift
  ins, p = pack_layer(dense, "d")
  assert ins["op"] == "dense" and ins["has_zeros"]
  assert ins["scale"] == ("float" if quantizer == "mean_abs" else "exp")
  got = jax.jit(lambda p, x: apply_instruction(ins, p, x))(p, x)
  np.testing.assert_array_equal(export.unpack(export.PackedModel([ins], "r0", {
      f"d/{k}": v for k, v in p.items()}, {}))["d"], dense.quantized_kernel())
  np.testing.assert_array_equal(got, dense(x))  # mean|w| too: alpha * the integer sum


class SmallCNN(nnx.Module):
  """A user's network, not in the package: float convs, flax BN, pool, flatten, MLP."""

  def __init__(self, rngs):
    self.conv1 = nnx.Conv(3, 16, (3, 3), padding="SAME", rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 16, (3, 3), padding=1, rngs=rngs)
    self.bn2 = nnx.BatchNorm(16, rngs=rngs)
    self.fc1 = nnx.Linear(16 * 4 * 4, 32, rngs=rngs)
    self.fc2 = nnx.Linear(32, 10, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn1(self.conv1(x)))
    x = jax.nn.relu(self.bn2(self.conv2(x)))
    x = nnx.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    return self.fc2(jax.nn.relu(self.fc1(x)))


def _randomize_vectors(model, seed=0):
  """Every per-channel vector (BN statistics and affine, biases, RSign thresholds,
  RPReLU) random, so that none of them is a no-op."""
  rng = np.random.default_rng(seed)
  for path, v in nnx.iter_graph(model):
    if isinstance(v, nnx.Variable) and v[...].ndim == 1:
      n = v[...].shape[0]
      if path[-1] == "var":
        value = rng.uniform(0.5, 2.0, n)
      elif path[-1] in ("scale", "slope"):
        value = rng.uniform(0.5, 1.5, n) * rng.choice([-1.0, 1.0], n)
      else:
        value = rng.normal(0.0, 0.3, n)
      v[...] = jnp.asarray(value, jnp.float32)


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_user_cnn_binarized_with_each_method_exports(method):
  model, _ = binarize.binarize_model(SmallCNN(nnx.Rngs(0)), method)
  _randomize_vectors(model)
  model.eval()
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  packed = export.pack(model, input_shape=(8, 8, 3))
  assert packed.binary_layers() == ["conv2", "fc1"]
  assert [i["op"] for i in packed.program] == [
      "nnx_conv", "nnx_bn", "act", "conv", "nnx_bn", "act", "max_pool", "reshape", "dense",
      "act", "linear"]
  ref = model(x)
  loaded = fmt.from_bytes(fmt.to_bytes(packed))
  for out in (export.infer(packed, x), export.infer(loaded, x, mode="layers")):
    # Every method: power-of-two scales are exact, and the mean|w| ones are applied after
    # the integer sum by the layer itself (layers._Binary._kernel_and_scale).
    np.testing.assert_array_equal(out, ref)


class _Generic(nnx.Module):
  """Operations outside the layers: a stride-2 SAME conv, a gate from a keepdims mean,
  a learnable gain (a constant array), avg pool, max over axes, concatenation, a
  leaky where."""

  def __init__(self, rngs):
    self.conv = nnx.Conv(3, 8, (3, 3), strides=2, padding="SAME", rngs=rngs)
    self.gain = nnx.Param(jnp.linspace(0.5, 1.5, 8))
    self.bconv = layers.BinaryConv(8, 8, 3, rngs=rngs)
    self.head = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, x):
    x = self.conv(x)
    x = (x - x.mean(axis=-1, keepdims=True)) * self.gain[...] + 0.1
    x = self.bconv(x * jax.nn.sigmoid(x.mean(axis=(1, 2), keepdims=True)))
    x = jnp.concatenate([nnx.avg_pool(x, (2, 2), (2, 2)).max(axis=(1, 2)),
                         x.mean(axis=(1, 2))], axis=-1)
    return self.head(jnp.where(x > 0, x, 0.1 * x))


def test_generic_operations_and_other_input_sizes(resnet20):
  model = _Generic(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(2), (2, 9, 9, 3))  # odd: SAME pads unevenly
  packed = export.pack(model, input_shape=(9, 9, 3))
  ops_used = {i["op"] for i in packed.program}
  assert {"mean", "const", "mul", "reduce_window_sum", "reduce_max", "concatenate",
          "select_n"} <= ops_used
  consts = [v for k, v in packed.arrays.items() if k.startswith("const")]
  assert [c.shape for c in consts] == [(1, 1, 1, 8)]  # the gain, once; scalars inline
  np.testing.assert_array_equal(export.infer(packed, x), model(x))
  np.testing.assert_array_equal(export.infer(packed, x, mode="layers"), model(x))
  # Programs keep no input size: a ResNet-20 packed at 32x32 runs at 16x16.
  model, _ = resnet20
  x16 = _images(size=16)
  np.testing.assert_allclose(export.infer(export.pack(model), x16), model(x16),
                             rtol=0, atol=1e-4)


def _version1(packed):
  """``packed``'s file as format version 1 wrote it: the hand-written ops of that
  version (shortcut_a, avg_pool) and no attributes of version 2."""
  program, i = [], 0
  while i < len(packed.program):
    ins = dict(packed.program[i])
    if ins["op"] == "slice":  # slice + pad: the option-A shortcut
      pad = packed.program[i + 1]
      ins = dict(op="shortcut_a", inputs=ins["inputs"], out=pad["out"],
                 planes=4 * pad["padding_config"][-1][0])
      i += 1
    elif ins["op"] == "mean":
      ins = dict(op="avg_pool", inputs=ins["inputs"], out=ins["out"])
    for k in ("scale", "bias", "act_shift", "rprelu"):
      ins.pop(k, None)
    program.append(ins)
    i += 1
  meta = {k: v for k, v in packed.meta.items() if k != "input_shape"}
  old = export.PackedModel(program, packed.output, packed.arrays, meta)
  data = fmt.to_bytes(old)
  return data[:8] + (1).to_bytes(4, "little") + data[12:]


def test_version_1_files_still_load_and_run(resnet20, tmp_path):
  model, x = resnet20
  packed = export.pack(model)
  path = tmp_path / "v1.irnet"
  path.write_bytes(_version1(packed))
  loaded = export.load(path)
  assert {i["op"] for i in loaded.program} >= {"shortcut_a", "avg_pool"}
  np.testing.assert_array_equal(export.infer(loaded, x, mode="layers"),
                                export.infer(packed, x, mode="layers"))


def test_infer_rejects_bad_images(resnet20):
  packed = export.pack(resnet20[0])
  with pytest.raises(ValueError, match="NHWC"):
    export.infer(packed, jnp.zeros((2, 32, 32)))
  with pytest.raises(ValueError, match="mode"):
    export.infer(packed, jnp.zeros((2, 32, 32, 3)), mode="eager")


# --- file format -------------------------------------------------------------------


def test_save_load_round_trip(resnet20, tmp_path):
  model, x = resnet20
  packed = export.pack(model, name="resnet20", kwargs={"num_classes": 10})
  path = tmp_path / "m.irnet"
  size = export.save(packed, path)
  assert size == path.stat().st_size
  loaded = export.load(path)
  assert loaded.program == packed.program and loaded.meta == packed.meta
  assert set(loaded.arrays) == set(packed.arrays)
  for k, v in packed.arrays.items():
    assert loaded.arrays[k].dtype == v.dtype
    np.testing.assert_array_equal(loaded.arrays[k], v)
  np.testing.assert_array_equal(export.infer(loaded, x, mode="layers"),
                                export.infer(packed, x, mode="layers"))


def test_load_rejects_bad_files(resnet20, tmp_path):
  data = fmt.to_bytes(export.pack(resnet20[0]))
  cases = {
      "corrupt": (data[:5000] + bytes([data[5000] ^ 0x10]) + data[5001:], "checksum"),
      "truncated": (data[:-100], "truncated"),
      "header_only": (data[:20], "truncated"),
      "newer": (data[:8] + (fmt.FORMAT_VERSION + 1).to_bytes(4, "little") + data[12:],
                "newer"),
      "magic": (b"PK\x03\x04" + data[4:], "magic"),
      "trailing": (data + b"\0", "trailing"),
  }
  for name, (blob, match) in cases.items():
    path = tmp_path / name
    path.write_bytes(blob)
    with pytest.raises(ValueError, match=match):
      export.load(path)


def test_load_rejects_inconsistent_payload(resnet20, tmp_path):
  packed = export.pack(resnet20[0])
  del packed.arrays["layer1.0.conv1/exp"]
  path = tmp_path / "m.irnet"
  export.save(packed, path)
  with pytest.raises(ValueError, match="layer1.0.conv1/exp"):
    export.load(path)


def _crafted(index: bytes, data: bytes = b"") -> bytes:
  """A file with a valid header and checksum around a hand-made index (a crafted file
  passes the checksum: only the parser stands between it and the program)."""
  import hashlib  # pylint: disable=import-outside-toplevel
  import struct  # pylint: disable=import-outside-toplevel
  payload = struct.pack("<Q", len(index)) + index
  payload += b"\0" * (-len(payload) % 8) + data
  return fmt._HEADER.pack(fmt.MAGIC, fmt.FORMAT_VERSION, 0, len(payload),
                          hashlib.sha256(payload).digest()) + payload


@pytest.mark.parametrize("index,match", [
    (b"[1, 2]", "not an object"),
    (b'{"arrays": [{"name": "a", "dtype": "float32", "shape": [-1], "offset": 24}]}',
     "not a list of sizes"),
    (b'{"arrays": [{"name": "a", "dtype": "float32", "shape": [4611686018427387904, 4],'
     b' "offset": 24}]}', "outside the payload"),
    (b'{"arrays": [{"name": "a", "dtype": "float32", "shape": [1], "offset": "8"}]}',
     "offset"),
    (b"[" * 100000 + b"]" * 100000, "malformed"),
    (b'{"arrays": [], "program": {"op": "conv"}, "output": "x", "meta": {}}',
     "program must be a list"),
    (b'{"arrays": [], "program": [7], "output": "x", "meta": {}}', "unknown op 7"),
    (b'{"arrays": [], "program": [{"op": "act", "inputs": "input", "out": "x"}],'
     b' "output": "x", "meta": {}}', "needs 'inputs'"),
    (b'{"arrays": [], "program": [{"op": "conv", "inputs": ["input"], "out": "x"}],'
     b' "output": "x", "meta": {}}', "missing or malformed attribute"),
    (b'{"arrays": [], "program": [{"op": "const", "inputs": [], "out": "x", "value": 1,'
     b' "dtype": "complex64"}], "output": "x", "meta": {}}', "malformed attribute.*complex64"),
    (b'{"arrays": [], "program": [{"op": "act", "inputs": ["input"], "out": "x",'
     b' "fn": "gelu"}], "output": "x", "meta": {}}', "malformed attribute.*gelu"),
    (b'{"arrays": [], "program": [{"op": "slice", "inputs": ["input"], "out": "x"}],'
     b' "output": "x", "meta": {}}', "malformed attribute.*start"),
    (b'{"arrays": [], "program": [], "output": ["input"], "meta": {}}', "never written"),
])
def test_load_rejects_crafted_files_with_one_error_type(tmp_path, index, match):
  path = tmp_path / "crafted.irnet"
  path.write_bytes(_crafted(index))
  with pytest.raises(fmt.PackedFormatError, match=match) as e:
    export.load(path)
  assert str(path) in str(e.value)


def _tiny(program=(), arrays=None, first=None, **meta) -> export.PackedModel:
  """A binary 3x3 conv ``c`` (4 -> 8 channels: K = 36 bits, 2 words per output channel)
  on 6x6x4 inputs (``first`` overrides its attributes), then ``program``, each
  instruction reading the previous one's output."""
  conv = dict(op="conv", name="c", inputs=["input"], out="r0", kernel_size=3, strides=1,
              padding=1, in_features=4, out_features=8, binary_weights=True,
              binary_acts=True, has_zeros=False, scale="exp", bias=False, act_shift=False,
              rprelu=False)
  prog = [{**conv, **(first or {})}]
  for n, ins in enumerate(program, 1):
    prog.append({"inputs": [f"r{n - 1}"], "out": f"r{n}", **ins})
  arrays = {"c/sign": np.zeros((8, 2), np.uint32), "c/exp": np.zeros(8, np.int8),
            **(arrays or {})}
  return export.PackedModel(prog, prog[-1]["out"], arrays,
                            {"in_channels": 4, "input_shape": [6, 6, 4], **meta})


def _unnamed() -> export.PackedModel:
  """The conv without a name: its arrays are looked up as "None/..." by load (present),
  by field under the instruction's name by infer (absent)."""
  packed = _tiny(arrays={"None/sign": np.zeros((8, 2), np.uint32),
                         "None/exp": np.zeros(8, np.int8)})
  del packed.program[0]["name"]
  return packed


_Z = np.zeros(8, np.float32)
# Each file passes the checksum and the structural checks; before the semantic checks
# infer failed on it (exception in the comment), or gave silently wrong/empty output.
_SEMANTIC_CASES = {
    "stride_0": (_tiny(first={"strides": 0}), "strides 0"),  # ZeroDivisionError
    "negative_padding": (_tiny(first={"padding": -1}), "padding -1"),  # ValueError
    "int64_overflow": (_tiny(first={"strides": 10**30}), "beyond"),  # TypeError (MLIR)
    "kernel_over_image": (_tiny(first={"padding": 0}, input_shape=[2, 2, 4]),
                          "output .2, 0, 0, 8. is empty"),  # empty logits
    "channels_vs_words": (_tiny(in_channels=32, input_shape=[6, 6, 32]),
                          "does not have in_features 4 channels"),  # misread: wrong logits
    "dense_in_features": (_tiny(first={"op": "dense", "in_features": 64}),
                          "in_features 64"),  # words dropped: wrong logits
    "no_layer_name": (_unnamed(), "name None"),  # KeyError
    "groups_0": (_tiny([{"op": "nnx_conv", "name": "n", "kernel_size": [1, 1],
                         "in_features": 8, "out_features": 8, "strides": [1, 1],
                         "padding": "SAME", "lhs_dilation": [1, 1], "rhs_dilation": [1, 1],
                         "feature_group_count": 0, "bias": False}],
                       {"n/kernel": np.zeros((1, 1, 8, 8), np.float32)}),
                 "feature_group_count 0"),  # ZeroDivisionError in load itself
    "pool_stride_0": (_tiny([{"op": "max_pool", "window": 2, "stride": 0, "padding": 0}]),
                      "stride 0"),  # TypeError
    "slice_stride_0": (_tiny([{"op": "slice", "start": [0] * 4, "limit": [None] * 4,
                               "strides": [1, 0, 1, 1]}]),
                       r"\(slice\).*ZeroDivisionError"),  # ZeroDivisionError
    "axis_out_of_range": (_tiny([{"op": "transpose", "permutation": [0, 3, 1, 7]}]),
                          r"\(transpose\).*permutation"),  # TypeError
    "bn_size_mismatch": (_tiny([{"op": "bn", "name": "b"}], {
        "b/mean": np.zeros(5, np.float32), "b/mul": _Z, "b/bias": _Z}),
                         "incompatible shapes"),  # TypeError
    "unhashable_attribute": (_tiny([{"op": "act", "fn": "relu", "x": {"a": 1}}]),
                             "holds a dict"),  # ValueError in mode="layers"
    "petabyte_padding": (_tiny([{"op": "pad", "value": 0.0, "padding_config": [
        [0, 0, 0], [0, 1 << 22, 0], [0, 1 << 22, 0], [0, 0, 0]]}]),
                         "over the bounds"),  # JaxRuntimeError: out of memory (1.1 PB)
    "meta_channels": (_tiny(in_channels=3), "does not end with in_channels 3"),  # ValueError
    # (the declared input size sets the memory bound, so it has a bound of its own)
    "meta_input_size": (_tiny(input_shape=[1 << 16, 1 << 16, 4]), "elements"),
}


def test_crafted_files_with_a_valid_checksum_fail_at_load_not_in_infer(tmp_path):
  path = tmp_path / "tiny.irnet"
  path.write_bytes(fmt.to_bytes(_tiny([{"op": "act", "fn": "relu"}])))
  assert export.infer(export.load(path), jnp.ones((1, 6, 6, 4))).shape == (1, 6, 6, 8)
  for name, (packed, match) in _SEMANTIC_CASES.items():
    path = tmp_path / f"{name}.irnet"
    path.write_bytes(fmt.to_bytes(packed))  # a valid header and checksum
    with pytest.raises(fmt.PackedFormatError, match=match) as e:
      export.load(path)
    assert str(path) in str(e.value), name


def test_packed_size_binary_layers_32x_smaller():
  model = _create("resnet18", {}, num_classes=1000)
  packed = export.pack(model)
  total_float = float32_param_bytes(model)
  assert len(fmt.to_bytes(packed)) <= total_float / 10
  for name in packed.binary_layers():
    sign = packed.arrays[f"{name}/sign"]
    ins = next(i for i in packed.program if i.get("name") == name)
    k = ins["kernel_size"] ** 2 * ins["in_features"] * ins["out_features"]
    assert sign.nbytes * 32 == 4 * k  # exactly 1 bit per weight (K is a multiple of 32)


# --- CLI ---------------------------------------------------------------------------


def test_export_workdir_exports_the_latest_checkpoint(tmp_path):
  # pylint: disable=import-outside-toplevel
  from irnet_jax import checkpointing, run_record
  from irnet_jax import config as config_lib
  from irnet_jax.export.workdir import export_workdir
  c = config_lib.base_config()
  c.model.num_classes = 10
  run_record.save_config(str(tmp_path), c)
  model = _create("resnet20", {})
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  for step in (1, 2):  # the newest one is exported
    ckpt.save(step, nnx.state(model), {"count": jnp.zeros((), jnp.int32)}, {"step": step})
    ckpt.wait()
  ckpt.close()
  out = tmp_path / "model.irnet"
  report = export_workdir(str(tmp_path), str(out))
  assert report["checkpoint_dir"].endswith("2") and report["check_same_argmax"]
  assert report["check_max_abs_diff"] <= 1e-4
  assert report["packed_file_bytes"] == out.stat().st_size
  assert report["float32_params_bytes"] / report["packed_file_bytes"] > 10
  packed = export.load(out)
  assert packed.meta["name"] == "resnet20" and packed.meta["config"]["model"]["num_classes"] == 10
