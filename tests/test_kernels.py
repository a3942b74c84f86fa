"""Convolution backends (irnet_jax.kernels): the seam, the XLA variants, the CPU kernels.

The kernel tests run where the host has AVX-512 VPOPCNTDQ and a C++ compiler (this
project's machines) and the kernels are not turned off (IRNET_JAX_CPU_KERNELS=0, the
CI's second run); the seam and fallback tests run everywhere.
"""
import json
import os
import pathlib
import platform
import re
import shutil
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from irnet_jax import binarize, kernels, models, ops
from irnet_jax import config as config_lib
from irnet_jax.kernels import avx512, build, xla, xla_cpu

REPO = pathlib.Path(__file__).resolve().parents[1]


def _host_supports_kernels() -> bool:
  flags = build.cpu_flags()
  return (platform.machine() == "x86_64" and all(f in flags for f in build.REQUIRED_CPU_FLAGS)
          and shutil.which(os.environ.get("CXX", "c++")) is not None)


KERNELS_ON = (_host_supports_kernels()
              and os.environ.get(kernels.KERNELS_ENV, "1") != "0")
needs_kernels = pytest.mark.skipif(not KERNELS_ON, reason="no AVX-512 VPOPCNTDQ CPU or "
                                   "C++ compiler, or IRNET_JAX_CPU_KERNELS=0")

# ------------------------------------------------------------------ the seam


def test_auto_resolves_for_the_devices_of_the_run():
  cpu = jax.devices("cpu")
  # One CPU device: the kernels exactly where the CPU and compiler allow them.
  assert kernels.resolve("auto", cpu[:1]) == ("avx512" if KERNELS_ON else "xla_cpu")
  assert kernels.resolve("auto") == kernels.resolve("auto", cpu[:1])  # default device
  # A multi-device CPU mesh: an XLA variant (XLA partitions it), without any flag.
  assert kernels.resolve("auto", cpu[:4]) == "xla_cpu"
  with pytest.raises(ValueError, match="opaque to XLA's partitioner"):
    kernels.resolve("avx512", cpu[:4])
  # GPU/TPU: plain XLA; the CPU-only variants are refused there.
  for name in ("gpu", "tpu"):
    accel = [types.SimpleNamespace(platform=name)]
    assert kernels.resolve("auto", accel) == "xla"
    assert kernels.resolve("xla", accel) == "xla"
    for cpu_only in ("xla_cpu", "avx512"):
      with pytest.raises(ValueError, match="runs on cpu devices"):
        kernels.resolve(cpu_only, accel)
  with pytest.raises(ValueError, match="choose one of"):
    kernels.resolve("cudnn", cpu[:1])
  with pytest.raises(ValueError, match="resolve it first"):
    kernels.get("auto")


def test_env_var_turns_the_kernels_off(monkeypatch):
  monkeypatch.setenv(kernels.KERNELS_ENV, "0")
  assert kernels.resolve("auto", jax.devices("cpu")[:1]) == "xla_cpu"
  with pytest.raises(ValueError, match="IRNET_JAX_CPU_KERNELS=0"):
    kernels.resolve("avx512", jax.devices("cpu")[:1])


def test_config_validates_conv_impl():
  c = config_lib.base_config()
  assert c.model.conv_impl == "auto"
  c.model.conv_impl = "fast"
  with pytest.raises(ValueError, match="model.conv_impl"):
    config_lib.validate(c)


def _available_backends():
  return ["xla", "xla_cpu"] + (["avx512"] if KERNELS_ON else [])


def test_resnet20_same_outputs_and_gradients_under_every_backend():
  # 1w1a, 16/32/64 channels: every binary conv on the kernels under "avx512".
  name = "resnet20"
  x = jax.random.normal(jax.random.key(5), (8, 16, 16, 3))
  y = jnp.arange(8) % 10
  ede = ops.EDE(jnp.float32(0.3), jnp.float32(3.3))

  def loss_and_grads(conv_impl):
    model = models.create(name, num_classes=10, rngs=nnx.Rngs(0), conv_impl=conv_impl)
    assert model.conv_impl == conv_impl  # the resolved backend, recorded on the model
    assert model.layer2[0].conv1.conv_impl == conv_impl

    binarize.set_ede(model, ede)

    @nnx.jit
    def step(m):
      def loss_fn(m):
        logits = m(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits
      return nnx.value_and_grad(loss_fn, has_aux=True)(m)

    (loss, logits), grads = step(model)
    model.eval()
    return loss, logits, model(x), grads, nnx.state(model, nnx.BatchStat)

  results = {b: loss_and_grads(b) for b in _available_backends()}
  ref = results.pop("xla")
  for backend, got in results.items():
    for tree_got, tree_ref in zip(got, ref):  # loss, train/eval logits, grads, BN stats
      for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree_got),
                              jax.tree_util.tree_leaves(tree_ref)):
        scale = float(jnp.abs(b).max()) + 1e-12
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale,
                                   err_msg=f"{backend} {path}")
  if KERNELS_ON:  # the kernels really ran (and only under their backend)
    hlo = {}
    for b in ("xla", "avx512"):
      graphdef, state = nnx.split(models.create(name, num_classes=10, conv_impl=b))
      hlo[b] = jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s)(v)).lower(state, x).as_text()
    assert "irnet_binary_conv_fwd" in hlo["avx512"]
    assert "irnet_" not in hlo["xla"]


def test_plain_xla_backend_is_plain_conv(x64):
  # "xla" (what GPU/TPU get): the convolution of the signs, no packed residual.
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(2, 6, 6, 5)))
  kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 4)))
  jaxpr = str(jax.make_jaxpr(lambda a, k: xla.conv(a, k, 2, 1, estimator="ste"))(x, kernel))
  assert "custom_vjp" in jaxpr and "uint8" not in jaxpr  # the sign's only
  np.testing.assert_array_equal(xla.conv(x, kernel, 2, 1, estimator="ste"),
                                ops.conv2d(jnp.sign(x), kernel, 2, 1))
  assert xla.conv(x, kernel, 1, 1, dtype=jnp.float32).dtype == jnp.float32


def _conv_dtypes(fn, *args) -> set[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of the convolutions ``jit(fn)`` lowers to."""
  text = jax.jit(fn).lower(*args).as_text()
  found = re.findall(r"stablehlo\.convolution.*? : \((tensor<[^>]*>), (tensor<[^>]*>)\) "
                     r"-> (tensor<[^>]*>)", text)
  return {tuple(t[:-1].rsplit("x", 1)[1] for t in types) for types in found}


def test_bfloat16_binary_conv_is_the_exact_float32_sum_rounded_once():
  # 3x3x64 taps of +-1 (or 0) times +-2^k (k in -4..1): every float32 sum is exact, and
  # bfloat16 holds every operand and product exactly; the one error is the result's
  # rounding, which happens once, after a float32 sum.
  x, kernel = _operands(7, 2, 6, 6, 64, 16, 3)
  # Mostly positive inputs and all-positive channels 0-3: sums of ~390 +-1 terms, more
  # significant bits than bfloat16's 8 (random signs would sum to ~24 and fit).
  x = (x + 1.0).at[0, 0, 0, :5].set(0.0)
  kernel = kernel.at[..., :4].set(jnp.abs(kernel[..., :4]))
  exact = ops.conv2d(jnp.sign(x), kernel, 1, 1)
  got = xla.conv(x, kernel, 1, 1, estimator="ste", binary_kernel=True, dtype=jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(got, exact.astype(jnp.bfloat16))
  # Some sums do not fit bfloat16: a conv rounding partial sums would differ there.
  assert np.any(np.asarray(exact.astype(jnp.bfloat16).astype(jnp.float32)) != exact)
  # Where the sums fit bfloat16 (3x3x16 taps: |sum| <= 144 units of 2^k), the bfloat16
  # binary conv equals the float32 one exactly.
  x16, k16 = x[..., :16], kernel[:, :, :16]
  np.testing.assert_array_equal(
      xla.conv(x16, k16, 1, 1, estimator="ste", binary_kernel=True,
               dtype=jnp.bfloat16).astype(jnp.float32),
      ops.conv2d(jnp.sign(x16), k16, 1, 1))

  # In the program, forward and backward: bfloat16 operands (and result).
  def loss(a, k):
    return xla.conv(a, k, 2, 1, estimator="ste", binary_kernel=True,
                    dtype=jnp.bfloat16).astype(jnp.float32).sum()
  assert _conv_dtypes(jax.value_and_grad(loss, argnums=(0, 1)), x, kernel) == {
      ("bf16", "bf16", "bf16")}
  # float32 operands: the plain float32 conv.
  assert _conv_dtypes(lambda a, k: xla.conv(a, k, 1, 1, estimator="ste"),
                      x, kernel) == {("f32", "f32", "f32")}


# ------------------------------------------------------------------ xla_cpu


def test_pack_ternary_round_trip_incl_zeros_and_odd_channels():
  b = jnp.asarray(np.random.default_rng(4).integers(-1, 2, size=(2, 3, 5, 13)), jnp.float32)
  planes = xla_cpu.pack_ternary(b)  # the library layout (irnet_jax.bits): uint32 words
  assert planes[0].dtype == jnp.uint32 and planes[0].shape == (2, 3, 5, 1)
  np.testing.assert_array_equal(xla_cpu.unpack_ternary(planes, 13, jnp.float32), b)


def test_sign_input_conv_matches_plain_conv_values_and_gradients(x64):
  rng = np.random.default_rng(5)
  x_b = jnp.asarray(rng.integers(-1, 2, size=(2, 6, 6, 5)), jnp.float64)
  kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 4)))
  g = jnp.asarray(rng.normal(size=(2, 3, 3, 4)))
  ref_out, vjp_packed = jax.vjp(lambda a, k: xla_cpu.sign_input_conv(a, k, 2, 1), x_b, kernel)
  ref_grads = vjp_packed(g)
  out, vjp = jax.vjp(lambda a, k: ops.conv2d(a, k, 2, 1), x_b, kernel)
  np.testing.assert_array_equal(ref_out, out)
  for a, b in zip(ref_grads, vjp(g)):
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_sign_input_conv_propagates_nan_like_plain_conv():
  rng = np.random.default_rng(6)
  x_b = jnp.asarray(rng.integers(-1, 2, size=(2, 6, 6, 5)), jnp.float32)
  x_b = x_b.at[1, 2, 3, 4].set(jnp.nan)  # sign(NaN) = NaN upstream
  kernel = jnp.asarray(rng.normal(size=(3, 3, 5, 4)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(2, 6, 6, 4)), jnp.float32)
  got = jax.vjp(lambda a, k: xla_cpu.sign_input_conv(a, k, 1, 1), x_b, kernel)[1](g)
  want = jax.vjp(lambda a, k: ops.conv2d(a, k, 1, 1), x_b, kernel)[1](g)
  assert np.isnan(want[1]).any() and not np.isnan(want[1]).all()
  for a, b in zip(got, want):
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # NaN == NaN here


# ------------------------------------------------------------------ the CPU kernels


def _operands(key, n, h, w, c, k, kh):
  kx, kw, ks = jax.random.split(jax.random.key(key), 3)
  x = jax.random.normal(kx, (n, h, w, c), jnp.float32)
  x = x.at[0, 0, 0, :5].set(0.0)  # sign(0) = 0 inside the image, not only at borders
  scale = 2.0 ** jax.random.randint(ks, (k,), -4, 2).astype(jnp.float32)
  kernel = jnp.sign(jax.random.normal(kw, (kh, kh, c, k))) * scale
  kernel = kernel.at[0, 0, 0, 0].set(0.0)  # a weight equal to its channel mean
  return x, kernel


SHAPES = [  # (n, h, w, c, k, kernel, stride, padding)
    (3, 8, 8, 16, 16, 3, 1, 1),
    (2, 9, 7, 32, 16, 3, 2, 1),   # odd sizes, stride 2
    (2, 6, 6, 16, 48, 3, 1, 0),   # no padding, K not a power of two
    (2, 5, 5, 64, 32, 1, 2, 0),   # 1x1 stride-2 (downsample shape)
    (1, 4, 4, 80, 16, 3, 1, 1),   # C = 5 * 16 (dx block of 1 vector)
]


@needs_kernels
@pytest.mark.parametrize("n,h,w,c,k,kh,s,p", SHAPES)
def test_forward_is_bitwise_the_float_conv_of_the_sign(n, h, w, c, k, kh, s, p):
  x, kernel = _operands(0, n, h, w, c, k, kh)
  got = jax.jit(lambda a, b: avx512.forward(a, b, s, p))(x, kernel)
  want = ops.conv2d(jnp.sign(x), kernel, s, p)
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)


@needs_kernels
@pytest.mark.parametrize("n,h,w,c,k,kh,s,p", SHAPES)
def test_gradient_kernels_match_xla(n, h, w, c, k, kh, s, p):
  x, kernel = _operands(1, n, h, w, c, k, kh)
  out, vjp = jax.vjp(lambda a, b: ops.conv2d(a, b, s, p), jnp.sign(x), kernel)
  g = jax.random.normal(jax.random.key(2), out.shape)
  dx_ref, dw_ref = vjp(g)
  dx, dw = avx512.gradients(x, kernel, g, s, p)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(dx_ref).max()))
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(dw_ref).max()))
  # Deterministic: the kernel-gradient sums run in a fixed order.
  again = avx512.gradients(x, kernel, g, s, p)
  np.testing.assert_array_equal(again[0], dx)
  np.testing.assert_array_equal(again[1], dw)


@needs_kernels
@pytest.mark.parametrize("estimator", ops.ESTIMATORS)
def test_binary_conv_op_equals_the_xla_path(estimator):
  x, w = _operands(3, 4, 8, 8, 16, 32, 3)
  kernel_b = ops.libra_pb(w)
  ede = ops.EDE(jnp.float32(0.7), jnp.float32(1.6))

  def loss(conv, a, b):
    return jnp.sum(jnp.sin(conv(a, b, 2, 1, estimator=estimator, ede=ede,
                                binary_kernel=True)))

  assert avx512.handles(x, kernel_b, estimator=estimator, binary_kernel=True)
  np.testing.assert_array_equal(avx512.binary_conv(x, kernel_b, ede, 2, 1, estimator),
                                ops.conv2d(jnp.sign(x), kernel_b, 2, 1))
  gx, gw = jax.grad(lambda a, b: loss(avx512.conv, a, b), (0, 1))(x, kernel_b)
  rx, rw = jax.grad(lambda a, b: loss(xla.conv, a, b), (0, 1))(x, kernel_b)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * float(jnp.abs(rx).max()))
  np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5 * float(jnp.abs(rw).max()))
  # (t, k) shape the backward only: no gradient flows to them.
  gt = jax.grad(lambda t: jnp.sum(avx512.binary_conv(x, kernel_b, ops.EDE(t, 1.0))))(0.5)
  assert float(gt) == 0.0


def test_support_is_decided_from_static_shapes_and_dtypes():
  x, kernel = jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 16, 32))
  ok = dict(estimator="ede", binary_kernel=True)
  assert avx512.handles(x, kernel, **ok)
  assert not avx512.handles(x, kernel, estimator=None, binary_kernel=True)  # float inputs
  assert not avx512.handles(x, kernel, estimator="ede", binary_kernel=False)  # float weights
  assert not avx512.handles(x, kernel, dtype=jnp.bfloat16, **ok)
  assert not avx512.handles(x[..., :8], kernel[:, :, :8], **ok)  # 8 channels
  assert not avx512.handles(x, kernel[..., :24], **ok)


@needs_kernels
def test_vmap_and_materialize():
  x, w = _operands(4, 2, 6, 6, 16, 16, 3)
  batched = jax.vmap(lambda a: avx512.forward(a[None], w, 1, 1)[0])(x)
  np.testing.assert_array_equal(batched, ops.conv2d(jnp.sign(x), w, 1, 1))
  y, vjp = jax.vjp(jax.jit(avx512.materialize), x)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_array_equal(vjp(2 * x)[0], 2 * x)


@needs_kernels
def test_wrong_shapes_are_rejected_with_an_error():
  x, kernel = jnp.ones((1, 4, 4, 8)), jnp.ones((3, 3, 8, 16))  # 8 input channels
  with pytest.raises(Exception, match="multiples of 16"):
    jax.block_until_ready(avx512.forward(x, kernel, 1, 1))
  with pytest.raises(Exception, match="input channels"):
    jax.block_until_ready(avx512.forward(jnp.ones((1, 4, 4, 32)), jnp.ones((3, 3, 16, 16)),
                                         1, 1))
  g = jnp.ones((1, 4, 4, 16))
  with pytest.raises(Exception, match="multiples of 16"):
    jax.block_until_ready(avx512.gradients(x, kernel, g, 1, 1))
  # An output shape that does not follow from the input (a direct FFI call).
  bad_out = jax.ShapeDtypeStruct((1, 5, 4, 16), jnp.float32)
  call = jax.ffi.ffi_call("irnet_binary_conv_fwd", bad_out, vmap_method="sequential")
  with pytest.raises(Exception, match=r"should be \(1, 4, 4, 16\)"):
    jax.block_until_ready(call(jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 16, 16)),
                               stride=np.int64(1), padding=np.int64(1)))
  with pytest.raises(Exception, match="stride must be >= 1"):
    jax.block_until_ready(call(jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 16, 16)),
                               stride=np.int64(0), padding=np.int64(1)))


@needs_kernels
def test_nan_in_gives_nan_out_like_xla():
  x, kernel = _operands(6, 2, 7, 7, 16, 32, 3)
  x = x.at[0, 3, 1, 4].set(jnp.nan).at[1, 0, 6, 0].set(jnp.nan)  # inside, and at a border
  kernel_nan = kernel.at[1, 2, 5, 7].set(jnp.nan)  # one weight of output channel 7
  for s in (1, 2):
    for k in (kernel, kernel_nan):
      want = ops.conv2d(jnp.sign(x), k, s, 1)  # jnp.sign(NaN) = NaN
      got = avx512.forward(x, k, s, 1)
      assert np.isnan(want).any() and not np.isnan(want).all()
      np.testing.assert_array_equal(got, want)  # NaN exactly where XLA has NaN
    # Backward: the kernel gradient keeps the NaN of sign(x), as XLA's.
    out, vjp = jax.vjp(lambda a, b: ops.conv2d(a, b, s, 1), jnp.sign(x), kernel)
    g = jax.random.normal(jax.random.key(7), out.shape)
    dx_ref, dw_ref = vjp(g)
    dx, dw = avx512.gradients(x, kernel, g, s, 1)
    assert np.isnan(dw_ref).any()
    np.testing.assert_array_equal(np.isnan(dw), np.isnan(dw_ref))
    np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-4)  # NaN == NaN here
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ building and loading


def test_cpu_check_before_anything_is_built(tmp_path):
  if platform.machine() != "x86_64":
    pytest.skip("x86-64 only")
  no_popcnt = frozenset(build.REQUIRED_CPU_FLAGS) - {"avx512_vpopcntdq"}
  with pytest.raises(build.Unavailable, match="lacks avx512_vpopcntdq"):
    build.library(root=tmp_path, flags=no_popcnt)
  with pytest.raises(build.Unavailable, match="cannot read"):
    build.library(root=tmp_path, flags=frozenset())
  assert not any(tmp_path.iterdir())  # nothing compiled, nothing loaded
  assert build.cpu_flags(str(tmp_path / "missing")) == frozenset()


def _fake_compiler(tmp_path, body: str) -> str:
  """A stand-in for $CXX: prints a version; the compile step runs ``body``."""
  path = tmp_path / "fake-c++"
  path.write_text("#!/bin/sh\n"
                  'if [ "$1" = --version ]; then echo "fake-c++ 1.0"; exit 0; fi\n'
                  + body + "\n")
  path.chmod(0o755)
  return str(path)


_WRITE_OUTPUT = ('for a; do if [ "$prev" = -o ]; then echo "$$" > "$a"; fi; prev="$a"; done;'
                 " exit 0")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 only")
def test_cache_entry_of_another_cpu_is_refused_and_rebuilt(tmp_path, monkeypatch):
  monkeypatch.setenv("CXX", _fake_compiler(tmp_path, _WRITE_OUTPUT))
  flags = frozenset(build.REQUIRED_CPU_FLAGS) | {"sse4_2"}
  lib = build.library(root=tmp_path / "cache", flags=flags)
  record = json.loads((lib.parent / "build.json").read_text())
  assert record["cpu_flags"] == sorted(flags) and record["compiler_version"] == "fake-c++ 1.0"
  first = lib.read_text()
  assert build.library(root=tmp_path / "cache", flags=flags) == lib
  assert lib.read_text() == first  # a matching entry is reused, not rebuilt
  # The same entry, written on "another CPU" (a shared home): never loaded, rebuilt.
  (lib.parent / "build.json").write_text(json.dumps({**record, "cpu_flags": ["avx2"]}))
  assert build.library(root=tmp_path / "cache", flags=flags) == lib
  assert lib.read_text() != first
  assert json.loads((lib.parent / "build.json").read_text()) == record
  # Another CPU's features, compiler or source give another entry altogether.
  other = build.library(root=tmp_path / "cache", flags=flags | {"amx_tile"})
  assert other.parent != lib.parent


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 only")
def test_compile_failure_and_timeout_raise_unavailable(tmp_path, monkeypatch):
  flags = frozenset(build.REQUIRED_CPU_FLAGS)
  monkeypatch.setenv("CXX", _fake_compiler(tmp_path, 'echo "error: no AVX-512" >&2; exit 1'))
  with pytest.raises(build.Unavailable, match="failed .*error: no AVX-512"):
    build.library(root=tmp_path / "a", flags=flags)
  monkeypatch.setenv("CXX", _fake_compiler(tmp_path, "sleep 20"))
  with pytest.raises(build.Unavailable, match="took over"):
    build.library(root=tmp_path / "b", flags=flags, timeout=0.5)
  monkeypatch.setenv("CXX", "/bin/false")
  with pytest.raises(build.Unavailable, match="--version"):
    build.library(root=tmp_path / "c", flags=flags)
  monkeypatch.setenv("CXX", "no-such-compiler")
  with pytest.raises(build.Unavailable, match="set CXX"):
    build.library(root=tmp_path / "d", flags=flags)


def test_a_failed_build_falls_back_to_xla_with_one_warning(tmp_path):
  # A fresh process whose compiler fails: "auto" falls back, explicit "avx512" is refused.
  code = ("import jax\n"
          "from irnet_jax import kernels, models\n"
          "assert kernels.resolve('auto') == 'xla_cpu', kernels.resolve('auto')\n"
          "assert models.create('resnet20', num_classes=10).conv_impl == 'xla_cpu'\n"
          "try:\n  kernels.resolve('avx512')\nexcept ValueError as e:\n  print('REFUSED', e)\n")
  env = dict(os.environ, CXX="/bin/false", IRNET_JAX_CACHE=str(tmp_path),
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.pop(kernels.KERNELS_ENV, None)
  out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr
  assert "REFUSED" in out.stdout
  if platform.machine() == "x86_64" and _host_supports_kernels():
    assert out.stderr.count("CPU binary-conv kernels unavailable") == 1, out.stderr


# ------------------------------------------------------------------ issue 19: damaged library

# A "library" of a few KB whose bytes differ from build to build (the pid).
_WRITE_BIG_OUTPUT = ('for a; do if [ "$prev" = -o ]; then yes "$$" | head -n 1000 > "$a"; fi;'
                     ' prev="$a"; done; exit 0')


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 only")
def test_damaged_library_is_detected_and_rebuilt_before_loading(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("CXX", _fake_compiler(tmp_path, _WRITE_BIG_OUTPUT))
  flags = frozenset(build.REQUIRED_CPU_FLAGS)
  lib = build.library(root=tmp_path / "cache", flags=flags)
  recorded = json.loads((lib.parent / "lib.json").read_text())
  assert recorded == build.file_digest(lib) and recorded["size"] > 1000
  assert build.check_library(lib.parent) is None
  # Cut short (a full disk, a crash): found by size, rebuilt, never returned as is.
  with open(lib, "r+b") as f:
    f.truncate(recorded["size"] // 2)
  assert "cut short" in build.check_library(lib.parent)
  with caplog.at_level("WARNING", logger=build.__name__):
    assert build.library(root=tmp_path / "cache", flags=flags) == lib
  assert build.check_library(lib.parent) is None and lib.stat().st_size == recorded["size"]
  assert "rebuilt the CPU kernels" in caplog.text and "cut short" in caplog.text
  # Same size, other bytes: found by the sha256.
  data = bytearray(lib.read_bytes())
  data[10] ^= 0xFF
  lib.write_bytes(bytes(data))
  assert "differs from the library that was built" in build.check_library(lib.parent)
  build.library(root=tmp_path / "cache", flags=flags)
  assert build.check_library(lib.parent) is None
  # An entry without the record (an older cache) is rebuilt too, quietly.
  (lib.parent / "lib.json").unlink()
  assert "no readable record" in build.check_library(lib.parent)
  caplog.clear()
  with caplog.at_level("WARNING", logger=build.__name__):
    build.library(root=tmp_path / "cache", flags=flags)
  assert build.check_library(lib.parent) is None and not caplog.text


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 only")
def test_damaged_library_that_cannot_be_rebuilt_falls_back_without_loading(
    tmp_path, monkeypatch, caplog):
  # The loader itself (build.load), in this process: dlopen is replaced, so the
  # damaged file could not crash it even if it reached dlopen.
  compiler = _fake_compiler(tmp_path, _WRITE_BIG_OUTPUT)
  monkeypatch.setenv("CXX", compiler)
  monkeypatch.setenv("IRNET_JAX_CACHE", str(tmp_path / "cache"))
  monkeypatch.setattr(build, "cpu_flags", lambda: frozenset(build.REQUIRED_CPU_FLAGS))
  lib = build.library()
  with open(lib, "r+b") as f:
    f.truncate(100)
  # The same compiler (path and version: the same cache entry) now fails.
  _fake_compiler(tmp_path, 'echo "error: No space left on device" >&2; exit 1')
  loaded = []
  monkeypatch.setattr(build.ctypes.cdll, "LoadLibrary", loaded.append)
  with caplog.at_level("WARNING", logger=build.__name__):
    assert build.load.__wrapped__() is None
  assert not loaded
  assert "kernels unavailable, using XLA's convolutions" in caplog.text
  assert "cut short" in caplog.text and "rebuilding it failed" in caplog.text
  assert "No space left on device" in caplog.text
