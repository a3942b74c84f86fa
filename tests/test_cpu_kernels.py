"""The hand-written CPU kernels (irnet_jax.cpu_kernels) against XLA's convolutions."""
import pathlib
import platform
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from irnet_jax import cpu_kernels, models, ops

_NEEDED = ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vpopcntdq")


def _host_supports_kernels() -> bool:
  cpuinfo = pathlib.Path("/proc/cpuinfo")
  flags = cpuinfo.read_text().split() if cpuinfo.exists() else []
  return (platform.machine() == "x86_64" and all(f in flags for f in _NEEDED)
          and shutil.which("c++") is not None)


def test_available_exactly_where_the_cpu_and_compiler_allow():
  # On this project's machines (x86-64 with AVX-512 and g++) the kernels must be
  # in use; elsewhere they must report unavailable so that XLA's convs are used.
  assert cpu_kernels.available() == _host_supports_kernels()


needs_kernels = pytest.mark.skipif(not _host_supports_kernels(),
                                   reason="host without AVX-512 VPOPCNTDQ or a C++ compiler")


def _conv(x, w, s, p):
  return ops.conv2d(x, w, s, p)


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
  got = jax.jit(lambda a, b: cpu_kernels.binary_conv(a, b, s, p))(x, kernel)
  want = _conv(jnp.sign(x), kernel, s, p)
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)


@needs_kernels
@pytest.mark.parametrize("n,h,w,c,k,kh,s,p", SHAPES)
def test_gradient_kernels_match_xla(n, h, w, c, k, kh, s, p):
  x, kernel = _operands(1, n, h, w, c, k, kh)
  x_b = jnp.sign(x)
  out, vjp = jax.vjp(lambda a, b: _conv(a, b, s, p), x_b, kernel)
  g = jax.random.normal(jax.random.key(2), out.shape)
  dx_ref, dw_ref = vjp(g)
  dx = cpu_kernels.conv_input_grad(g, kernel, (h, w), s, p)
  dw = cpu_kernels.conv_kernel_grad(x_b, g, (kh, kh), s, p)
  dw_sign = cpu_kernels.conv_kernel_grad(x, g, (kh, kh), s, p, sign_input=True)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(dx_ref).max()))
  np.testing.assert_allclose(dw, dw_ref, rtol=1e-5, atol=1e-5 * float(jnp.abs(dw_ref).max()))
  np.testing.assert_array_equal(dw_sign, dw)  # sign taken inside == sign taken before
  fused_dx, fused_dw = cpu_kernels.binary_conv_grads(x, kernel, g, s, p)  # one pass
  np.testing.assert_array_equal(fused_dx, dx)
  np.testing.assert_array_equal(fused_dw, dw)
  # Deterministic: the kernel-gradient sums run in a fixed order.
  np.testing.assert_array_equal(cpu_kernels.conv_kernel_grad(x_b, g, (kh, kh), s, p), dw)


@needs_kernels
@pytest.mark.parametrize("estimator", ops.ESTIMATORS)
def test_binary_conv_op_equals_the_xla_path(estimator):
  x, w = _operands(3, 4, 8, 8, 16, 32, 3)
  kernel_b = ops.libra_pb(w)
  ede = ops.EDE(jnp.float32(0.7), jnp.float32(1.6))

  def fast(a, b):
    return jnp.sum(jnp.sin(ops.binary_conv(a, b, ede, 2, 1, estimator)))

  def reference(a, b):
    return jnp.sum(jnp.sin(ops.sign_input_conv(ops.binarize(a, estimator, ede), b, 2, 1)))

  assert ops.binary_conv_supported(x, kernel_b)
  np.testing.assert_array_equal(ops.binary_conv(x, kernel_b, ede, 2, 1, estimator),
                                ops.conv2d(jnp.sign(x), kernel_b, 2, 1))
  (gx, gw), (rx, rw) = jax.grad(fast, (0, 1))(x, kernel_b), jax.grad(reference, (0, 1))(
      x, kernel_b)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5 * float(jnp.abs(rx).max()))
  np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5 * float(jnp.abs(rw).max()))
  # (t, k) shape the backward only: no gradient flows to them.
  gt = jax.grad(lambda t: jnp.sum(ops.binary_conv(x, kernel_b, ops.EDE(t, 1.0))))(0.5)
  assert float(gt) == 0.0


@needs_kernels
def test_vmap_and_materialize():
  x, w = _operands(4, 2, 6, 6, 16, 16, 3)
  batched = jax.vmap(lambda a: cpu_kernels.binary_conv(a[None], w, 1, 1)[0])(x)
  np.testing.assert_array_equal(batched, _conv(jnp.sign(x), w, 1, 1))
  y, vjp = jax.vjp(jax.jit(cpu_kernels.materialize), x)
  np.testing.assert_array_equal(y, x)
  np.testing.assert_array_equal(vjp(2 * x)[0], 2 * x)


@needs_kernels
def test_resnet20_train_gradients_same_with_and_without_kernels():
  x = jax.random.normal(jax.random.key(5), (8, 16, 16, 3))
  y = jnp.arange(8) % 10
  ede = ops.EDE(jnp.float32(0.3), jnp.float32(3.3))

  def loss_and_grads():
    model = models.create("resnet20", num_classes=10, rngs=nnx.Rngs(0))

    @nnx.jit
    def step(m):
      def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x, ede), y).mean()
      return nnx.value_and_grad(loss_fn)(m)

    loss, grads = step(model)
    return loss, grads, nnx.state(model, nnx.BatchStat)

  fast = loss_and_grads()
  with cpu_kernels.disabled():
    assert not ops.binary_conv_supported(x, x)
    ref = loss_and_grads()
  np.testing.assert_allclose(fast[0], ref[0], rtol=1e-6)
  for tree_fast, tree_ref in zip(fast[1:], ref[1:]):  # gradients, BN running stats
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(tree_fast),
                            jax.tree_util.tree_leaves(tree_ref)):
      scale = float(jnp.abs(b).max()) + 1e-12
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * scale, err_msg=str(path))


def test_unavailable_kernels_raise_a_clear_error(monkeypatch):
  monkeypatch.setenv("IRNET_JAX_CPU_KERNELS", "0")
  assert not cpu_kernels.available()
  with pytest.raises(RuntimeError, match="unavailable"):
    cpu_kernels.binary_conv(jnp.ones((1, 4, 4, 16)), jnp.ones((3, 3, 16, 16)), 1, 1)
  x = jnp.ones((1, 4, 4, 16))
  assert not ops.binary_conv_supported(x, jnp.ones((3, 3, 16, 16)))
