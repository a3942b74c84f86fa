"""Throughput of packed (XOR + popcount) inference vs the float-simulated eval forward.

  python experiments/inference_bench.py [--models resnet20,resnet18] [--batches 1,64]
      [--repeats 2] [--layers-mode]

For ResNet-20 (32x32) and ImageNet ResNet-18 (224x224), random weights: images/s
of ``irnet_jax.export.infer`` (the whole packed network jitted as one computation)
and of the jitted ``model.eval()`` forward with XLA's float convolutions on +-1
values ("float", the ``conv_impl="xla"`` backend), at each batch size, on the host
CPU. Where the ``"avx512"`` backend (``irnet_jax.kernels``) runs, also of the same
forward on its kernels ("cpu_kernels": the XNOR/popcount forward the training step
uses; asserted equal to "float"). Each
measurement is repeated and the best repetition kept (the CPU may be shared). Also
reports compile times, agreement of float and packed (max |logit diff|, argmax) and
the sizes: float32 parameters, the packed file, and the binary layers alone. The last stdout line
is a JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from irnet_jax import export, kernels, models
from irnet_jax.export import format as export_format
from irnet_jax.export.pack import float32_param_bytes

_SIZES = {"resnet20": 32, "resnet18": 224}
_CLASSES = {"resnet20": 10, "resnet18": 1000}


def _iters(name: str, batch: int) -> int:
  """Timed iterations: ~1-3 s of work each on a 2-core CPU."""
  if name == "resnet18":
    return 5 if batch == 1 else 2
  return 50 if batch == 1 else 10


def _time(fn, x, iters: int, repeats: int) -> tuple[float, float]:
  """(first-call seconds incl. compile, best seconds per iteration)."""
  t = time.perf_counter()
  jax.block_until_ready(fn(x))
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      out = fn(x)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / iters)
  return first, best


def _randomize_bn(model: nnx.Module, seed: int) -> None:
  """Non-trivial running statistics (the default mean 0 / var 1 would also do)."""
  rng = np.random.default_rng(seed)
  from irnet_jax import layers  # pylint: disable=import-outside-toplevel
  for _, m in nnx.iter_graph(model):
    if isinstance(m, layers.BatchNorm):
      c = m.mean.shape[0]
      m.mean[...] = jnp.asarray(rng.normal(0, 0.5, c), jnp.float32)
      m.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c), jnp.float32)


def _sizes(model: nnx.Module, packed: export.PackedModel) -> dict:
  binary = packed.binary_layers()
  by_name = {i.get("name"): i for i in packed.program}
  bits = sum(packed.arrays[f"{n}/{f}"].nbytes for n in binary
             for f in ("sign", "exp", "nonzero") if f"{n}/{f}" in packed.arrays)
  float_binary = sum(4 * by_name[n]["kernel_size"] ** 2 * by_name[n]["in_features"]
                     * by_name[n]["out_features"] for n in binary)
  float_bytes = float32_param_bytes(model)
  file_bytes = len(export_format.to_bytes(packed))
  return {"float32_params_bytes": float_bytes, "packed_file_bytes": file_bytes,
          "file_ratio": round(float_bytes / file_bytes, 2),
          "binary_layers_float32_bytes": float_binary, "binary_layers_packed_bytes": bits,
          "binary_layers_ratio": round(float_binary / bits, 2)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="resnet20,resnet18")
  parser.add_argument("--batches", default="1,64")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--layers-mode", action="store_true",
                      help="also time infer(mode='layers') (one jit per instruction)")
  args = parser.parse_args()

  rows, sizes = [], {}
  for name in args.models.split(","):
    model = models.create(name, num_classes=_CLASSES[name], rngs=nnx.Rngs(0),
                          conv_impl="xla")  # XLA's float convolutions
    _randomize_bn(model, 0)
    model.eval()
    graphdef, state = nnx.split(model)
    float_fwd = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
    with_kernels = kernels.resolve("auto") == "avx512"
    if with_kernels:  # the same model and state on the kernels
      kernel_model = models.create(name, num_classes=_CLASSES[name], conv_impl="avx512")
      kernel_model.eval()
      kernel_graphdef, _ = nnx.split(kernel_model)
      kernel_fwd = jax.jit(lambda s, x, g=kernel_graphdef: nnx.merge(g, s)(x))
    t = time.perf_counter()
    packed = export.pack(model, name=name)
    pack_s = time.perf_counter() - t
    sizes[name] = dict(_sizes(model, packed), pack_seconds=round(pack_s, 2))
    print(f"{name}: {json.dumps(sizes[name])}", flush=True)
    for batch in (int(b) for b in args.batches.split(",")):
      size = _SIZES[name]
      x = jax.random.normal(jax.random.key(batch), (batch, size, size, 3))
      iters = _iters(name, batch)
      variants = {"float": lambda x: float_fwd(state, x),
                  "packed": lambda x: export.infer(packed, x)}
      if with_kernels:
        variants["cpu_kernels"] = lambda x: kernel_fwd(state, x)
      if args.layers_mode:
        variants["packed_layers"] = lambda x: export.infer(packed, x, mode="layers")
      row = {"model": name, "input": size, "batch": batch, "iters": iters}
      for key, fn in variants.items():
        first, per_iter = _time(fn, x, iters, args.repeats)
        row[f"{key}_img_s"] = round(batch / per_iter, 1)
        row[f"{key}_ms"] = round(per_iter * 1e3, 2)
        row[f"{key}_first_call_s"] = round(first, 2)
      # Agreement with the eager model.eval() forward (the reference of the tests),
      # and with the jitted one, whose BN XLA contracts into FMAs (other rounding).
      out = export.infer(packed, x)
      for key, ref in (("eager", model(x)), ("jit", float_fwd(state, x))):
        row[f"max_abs_diff_{key}"] = float(jnp.max(jnp.abs(ref - out)))
        row[f"same_argmax_{key}"] = bool(jnp.all(ref.argmax(-1) == out.argmax(-1)))
      row["speedup"] = round(row["packed_img_s"] / row["float_img_s"], 2)
      if "cpu_kernels_img_s" in row:
        np.testing.assert_array_equal(kernel_fwd(state, x), float_fwd(state, x))
      rows.append(row)
      print(json.dumps(row), flush=True)

  print(f"\n{'model':<10}{'input':>6}{'batch':>6}{'float img/s':>13}{'packed img/s':>14}"
        f"{'speedup':>9}{'cpu_kernels img/s':>19}")
  for r in rows:
    print(f"{r['model']:<10}{r['input']:>6}{r['batch']:>6}{r['float_img_s']:>13}"
          f"{r['packed_img_s']:>14}{r['speedup']:>9}{r.get('cpu_kernels_img_s', '-'):>19}")
  env = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
         "load_avg_1m": round(os.getloadavg()[0], 2), "jax": jax.__version__,
         "backend": jax.default_backend()}
  print(json.dumps({"env": env, "rows": rows, "sizes": sizes}))


if __name__ == "__main__":
  main()
