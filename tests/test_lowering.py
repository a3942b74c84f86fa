"""The launcher's jitted programs lower for the accelerators, from this CPU-only CI.

For every registry model, :func:`irnet_jax.train.build` (what the launcher calls) makes
the real jitted programs with ``conv_impl="xla"`` (what ``"auto"`` resolves to on GPU
and TPU). ``jax.export`` lowers each for TPU and CUDA together from abstract arguments
carrying the launcher's shardings; lowering for another platform needs no accelerator
and compiles nothing. Checked in the StableHLO text:

* no custom call that only a CPU can run: the AVX-512 kernels' FFI targets
  (:data:`irnet_jax.kernels.avx512._TARGETS`), CPU callbacks, LAPACK, anything named
  for the CPU. jax.export refuses most of these itself; this test does not rely on it
  (a ``disabled_checks`` would let them through).
* ``compute_dtype="bfloat16"``: every convolution, forward and backward, takes
  bfloat16 operands (cuDNN and the TPU's MXU sum them in float32; see
  :mod:`irnet_jax.kernels.xla`); ``"float32"``: every convolution is float32 throughout.

Shapes are small (2 images; 32x32 for the CIFAR models, 64x64 for the ImageNet ones):
tracing cost does not depend on them, and no program is compiled.
"""
from __future__ import annotations

import functools
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from irnet_jax import config as config_lib
from irnet_jax import configs, models, train
from irnet_jax.kernels import avx512

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLATFORMS = ("tpu", "cuda")
BATCH = 2                # Images per step (one device).
STEPS_PER_CALL = 2       # K of Setup.train_call; also the test batches of eval_all.
NUM_CLASSES = 10
IMAGENET_SIZE = 64       # Pixels; the designed 224 would trace the same program.
# Custom-call targets only a CPU runs; any target containing "cpu" counts too.
CPU_TARGETS = frozenset(avx512._TARGETS)
CPU_TARGET_PREFIXES = ("irnet_", "lapack_", "xla_python_cpu_callback",
                       "xla_ffi_python_cpu_callback")

# ------------------------------------------------------------------ helpers


@functools.cache
def _config_files() -> dict[str, str]:
  """model name -> the first packaged recipe (by name, sorted) that trains it."""
  found: dict[str, str] = {}
  for name in configs.names():
    found.setdefault(configs.get_config(name).model.name, name)
  return found


def model_config(name: str, compute_dtype: str) -> ml_collections.ConfigDict:
  """The launcher config of model ``name`` (its packaged recipe, or the base
  recipe of its input size), with the backend GPU/TPU get and a resolved class count."""
  recipe = _config_files().get(name)
  if recipe is not None:
    c = configs.get_config(recipe)
  elif models.spec(name).input_size == 32:
    c = config_lib.base_config()
    c.model.name = name
  else:
    c = config_lib.imagenet_config(name)
  c.model.conv_impl = "xla"
  c.steps_per_call_mode = "scan"  # What "auto" resolves to on GPU and TPU.
  c.model.num_classes = NUM_CLASSES
  c.compute_dtype = compute_dtype
  return c


def image_size(name: str) -> int:
  """Test input height = width (pixels): the CIFAR models' 32, or IMAGENET_SIZE."""
  size = models.spec(name).input_size
  return size if size == 32 else IMAGENET_SIZE


def _abstract(tree):
  """Shape, dtype and sharding of every array of ``tree``; no data."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _batch(lead: tuple[int, ...], size: int, sharding, eval_batch: bool = False) -> dict:
  """An abstract host batch: image uint8 (*lead, size, size, 3) NHWC, label int32 lead,
  and for evaluation mask bool lead; ``lead`` is (B,) or (K, B)."""
  spec = functools.partial(jax.ShapeDtypeStruct, sharding=sharding)
  batch = dict(image=spec(lead + (size, size, 3), jnp.uint8), label=spec(lead, jnp.int32))
  if eval_batch:
    batch["mask"] = spec(lead, jnp.bool_)
  return batch


def programs(setup: train.Setup, size: int) -> dict[str, tuple[Callable, tuple]]:
  """Every jitted program the launcher runs on the devices, with abstract arguments:
  name -> (jitted function, args). A new program is one more entry."""
  state = _abstract(setup.state)
  model_state = state[0]  # What the loop passes to eval: (model, optimizer)[0].
  step, stacked = (BATCH,), (STEPS_PER_CALL, BATCH)
  return {
      "train_step": (setup.train_step, (state, _batch(step, size, setup.batch_sharding))),
      "train_call": (setup.train_call,
                     (state, _batch(stacked, size, setup.stacked_sharding))),
      "eval_step": (setup.eval_step,
                    (model_state, _batch(step, size, setup.batch_sharding, True))),
      "eval_all": (setup.eval_all,
                   (model_state, _batch(stacked, size, setup.stacked_sharding, True))),
  }


def export_all(name: str, compute_dtype: str, only: tuple[str, ...] | None = None
               ) -> dict[str, jax.export.Exported]:
  """``programs`` of model ``name`` exported for :data:`PLATFORMS` (lowered, not
  compiled); ``only``: a subset of the program names."""
  setup = train.build(model_config(name, compute_dtype), jax.devices()[:1],
                      steps_per_epoch=10, total_steps=100)
  out = {}
  for program, (fn, args) in programs(setup, image_size(name)).items():
    if only is None or program in only:
      out[program] = jax.export.export(fn, platforms=PLATFORMS)(*args)
  return out


def custom_call_targets(mlir: str) -> set[str]:
  """Targets of every custom call in StableHLO text (pretty or generic form)."""
  return (set(re.findall(r"stablehlo\.custom_call @([\w.$-]+)", mlir))
          | set(re.findall(r'call_target_name = "([^"]+)"', mlir)))


def cpu_only(targets: set[str]) -> set[str]:
  """The targets of ``targets`` that only a CPU runs."""
  return {t for t in targets if t in CPU_TARGETS or "cpu" in t.lower()
          or t.startswith(CPU_TARGET_PREFIXES)}


_TENSOR = r"tensor<[^>]*>"
_CONV = re.compile(rf"stablehlo\.convolution.*? : \(({_TENSOR}), ({_TENSOR})\) -> "
                   rf"({_TENSOR})")


def conv_dtypes(mlir: str) -> list[tuple[str, str, str]]:
  """(lhs, rhs, result) element types of every convolution, e.g. ("bf16", "bf16", "f32")."""
  return [tuple(t[:-1].rsplit("x", 1)[1] for t in types) for types in _CONV.findall(mlir)]


# ------------------------------------------------------------------ the detectors


def test_detectors_see_cpu_custom_calls_and_convolution_dtypes():
  # Positive control: the same regexes over programs that do hold what they look for.
  def kernels(x):
    for target in sorted(CPU_TARGETS):
      x = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(x.shape, x.dtype))(x)
    return x

  x = jax.ShapeDtypeStruct((4,), jnp.float32)
  with pytest.raises(ValueError, match="custom calls"):  # jax.export's own check
    jax.export.export(jax.jit(kernels), platforms=PLATFORMS)(x)
  unchecked = [jax.export.DisabledSafetyCheck.custom_call(t) for t in CPU_TARGETS]
  mlir = jax.export.export(jax.jit(kernels), platforms=PLATFORMS,
                           disabled_checks=unchecked)(x).mlir_module()
  assert cpu_only(custom_call_targets(mlir)) == CPU_TARGETS
  callback = jax.jit(lambda v: jax.pure_callback(
      lambda a: a, jax.ShapeDtypeStruct(v.shape, v.dtype), v)).lower(x).as_text()
  assert cpu_only(custom_call_targets(callback)), custom_call_targets(callback)

  conv = jax.jit(lambda a, b: jax.lax.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32))
  args = (jax.ShapeDtypeStruct((2, 5, 5, 3), jnp.bfloat16),
          jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.bfloat16))
  mlir = jax.export.export(conv, platforms=PLATFORMS)(*args).mlir_module()
  assert set(conv_dtypes(mlir)) == {("bf16", "bf16", "f32")}


# ------------------------------------------------------------------ the programs

_IMAGENET = {n for n, s in models.REGISTRY.items() if s.input_size != 32}
# Both tests, 2-core machine: the four CIFAR models ~25 s, the four ImageNet ones ~37 s
# (resnet34: 6.6 s float32 + 3.8 s bfloat16): those run with the slow tests.
_MODELS = [pytest.param(n, marks=pytest.mark.slow) if n in _IMAGENET else n
           for n in models.REGISTRY]


@pytest.mark.parametrize("name", _MODELS)
def test_programs_lower_for_tpu_and_cuda_without_cpu_custom_calls(name):
  exported = export_all(name, "float32")
  assert set(exported) == {"train_step", "train_call", "eval_step", "eval_all"}
  for program, exp in exported.items():
    assert exp.platforms == PLATFORMS
    mlir = exp.mlir_module()
    assert not cpu_only(custom_call_targets(mlir)), (program, custom_call_targets(mlir))
    dtypes = conv_dtypes(mlir)
    assert dtypes, f"{program}: no convolution found (the regex is stale?)"
    assert set(dtypes) == {("f32", "f32", "f32")}, (program, set(dtypes))


@pytest.mark.parametrize("name", _MODELS)
def test_bfloat16_compute_convolves_bfloat16_operands(name):
  # Training and evaluation; train_call runs train_step's body, already covered.
  exported = export_all(name, "bfloat16", only=("train_step", "eval_step"))
  for program, exp in exported.items():
    mlir = exp.mlir_module()
    assert not cpu_only(custom_call_targets(mlir)), (program, custom_call_targets(mlir))
    dtypes = conv_dtypes(mlir)
    assert dtypes and set(dtypes) == {("bf16", "bf16", "bf16")}, (program, set(dtypes))
    # Parameters and optimizer state stay float32 (only the compute is bfloat16).
    assert {a.dtype for a in jax.tree.leaves(exp.in_avals)
            if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
  # The train step's convolutions include the backward ones (input and kernel
  # gradients: ~3x the forward's), so the bfloat16 check above covered them.
  assert len(conv_dtypes(exported["train_step"].mlir_module())) > \
      2 * len(conv_dtypes(exported["eval_step"].mlir_module()))


def test_resident_data_train_call_lowers_for_tpu_and_cuda(tmp_path):
  # The K-step call over data held on the device (dataset.cache_on_device): gather,
  # crop and flip inside the scan, as the accelerators run it.
  rng = np.random.default_rng(0)
  path = tmp_path / "tiny.npz"
  np.savez(path, x_train=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
           y_train=rng.integers(0, NUM_CLASSES, 40),
           x_test=rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8),
           y_test=rng.integers(0, NUM_CLASSES, 6))
  c = model_config("resnet20", "float32")
  c.dataset.name, c.dataset.path, c.dataset.cache_on_device = "npz", str(path), True
  c.eval_batch_size = 2
  setup = train.build(c, jax.devices()[:1], steps_per_epoch=10, total_steps=100)
  indices = jax.ShapeDtypeStruct((STEPS_PER_CALL, BATCH), jnp.int32,
                                 sharding=setup.stacked_sharding)
  for fn, args in ((setup.train_call, (_abstract(setup.state), _abstract(setup.resident.train),
                                       indices)),
                   (setup.eval_all, (_abstract(setup.state)[0],
                                     _abstract(setup.resident.test)))):
    mlir = jax.export.export(fn, platforms=PLATFORMS)(*args).mlir_module()
    assert not cpu_only(custom_call_targets(mlir)), custom_call_targets(mlir)
    assert "stablehlo.while" in mlir or fn is setup.eval_all  # the scan of K steps
