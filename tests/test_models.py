"""Every model builds, runs forward/backward, and has the expected size and dtype."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irnet_jax import binarize, layers, models, ops

# Every registered model as registered, and variants of the options on two of them.
CASES = [(name, {}) for name in models.REGISTRY] + [
    ("resnet20", {"structure": "plain"}),
    ("resnet20", {"act_bits": 32}), ("resnet20", {"weight_bits": 32, "act_bits": 32}),
    ("resnet20", {"estimator": "ste", "weight_quantizer": "sign"}),
    ("resnet20", {"estimator": "approx_sign"}),
    ("resnet18", {"act_bits": 32}),
]


def _param_count(model):
  return sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name,kw", CASES)
def test_forward_backward_shapes(name, kw):
  model = models.create(name, num_classes=7, rngs=nnx.Rngs(0), **kw)
  size = models.spec(name).min_input_size
  x = jax.random.normal(jax.random.key(0), (2, size, size, 3))
  model.eval()
  assert model(x).shape == (2, 7)
  model.train()

  def grads_at(k):
    binarize.set_ede(model, ops.EDE(0.3, k))
    return nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model)

  grads = grads_at(3.3)
  leaves = jax.tree.leaves(grads)
  assert leaves and all(np.all(np.isfinite(g)) for g in leaves)
  convs = [(path, m) for path, m in nnx.iter_graph(model)
           if isinstance(m, layers.BinaryConv) and m.kernel_size == 3]
  assert len(convs) >= 5
  # Every binary-weight kernel gets gradient through the weight estimator.
  for path, conv in convs:
    g = functools.reduce(lambda s, key: s[key], path, grads)["kernel"][...]
    assert float(jnp.abs(g).sum()) > 0 or not conv.binary_weights, path
  # The FP stem gets gradient through the activation estimators, not only through the
  # shortcuts: EDE's k scales its backward, and k = 0 leaves only the shortcut paths.
  _, last = convs[-1]  # a binary conv in every model (the stem may be 3x3 too)
  if last.binary_acts and last.estimator == "ede":
    stem = "conv0" if "conv0" in grads else "conv1"
    g, g0 = (np.asarray(gr[stem]["kernel"][...]) for gr in (grads, grads_at(0.0)))
    assert np.abs(g - g0).max() > 1e-3 * np.abs(g).max()


def test_resnet20_param_count_is_027m():
  n = _param_count(models.create("resnet20"))
  assert 0.26e6 < n < 0.28e6, n
  assert n == 269850  # the official ResNet-20 (with BatchNorm1d before the FC)


def test_float64_end_to_end(x64):
  model = models.create("resnet20", param_dtype=jnp.float64)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 16, 3)))
  model.train()
  binarize.set_ede(model, ops.EDE(0.5, 2.0))
  grads = nnx.grad(lambda m: m(x).sum())(model)
  assert model(x).dtype == jnp.float64
  assert all(g.dtype == jnp.float64 for g in jax.tree.leaves(grads))


def test_bfloat16_compute_keeps_float32_params_and_stats():
  model = models.create("resnet20", dtype=jnp.bfloat16)
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  model.train()
  y = model(x)
  assert y.dtype == jnp.bfloat16
  assert model.layer1[0].bn1.mean.dtype == jnp.float32
  assert model.layer1[0].conv1.kernel.dtype == jnp.float32


def test_registry_entries_describe_their_models():
  for name, spec in models.REGISTRY.items():
    assert spec.name == name
    model = nnx.eval_shape(lambda s=spec: s.build(rngs=nnx.Rngs(0)))
    assert type(model) is spec.family
    # The designed input size gives logits; VGG-Small accepts no other.
    x = jax.ShapeDtypeStruct((1, spec.input_size, spec.input_size, 3), jnp.float32)
    assert nnx.eval_shape(lambda m, x: m(x), model, x).shape[0] == 1
  vgg = nnx.eval_shape(lambda: models.create("vgg_small"))
  with pytest.raises(TypeError, match="8192"):
    nnx.eval_shape(lambda m: m(jnp.zeros((1, 16, 16, 3))), vgg)


def test_unknown_model_name():
  with pytest.raises(ValueError, match="unknown model"):
    models.create("resnet50")
