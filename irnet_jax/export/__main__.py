"""Exports the latest (or a given) checkpoint of a training run as a packed model.

  python -m irnet_jax.export --workdir=DIR --out=FILE [--step=N] [--no-check] [--debug]

Restores ``DIR/checkpoints/<step>/`` with :func:`irnet_jax.checkpointing.load_model`,
packs it, writes FILE and prints the sizes: float32 parameters, the checkpoint on
disk (model state only where Orbax stores it separately) and the packed file. With
the check (default) it also runs the packed model on two random images at the
training resolution and reports the largest logit difference to the float model's
eval forward. The model is built for this host's devices whatever backend the run
was trained with. Errors are one ``error: ...`` line and exit status 1 (``--debug``
or ``IRNET_JAX_DEBUG=1``: the traceback).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from irnet_jax import workdir as workdir_lib
from irnet_jax.export.format import save
from irnet_jax.export.infer import infer
from irnet_jax.export.pack import float32_param_bytes, pack


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
  return total


def _checkpoint_dir(workdir: str, step: int | None) -> str | None:
  """``DIR/checkpoints/<step>`` (the newest integer-named one if step is None)."""
  root = os.path.join(workdir, "checkpoints")
  if step is None:
    steps = [int(d) for d in os.listdir(root) if d.isdigit()] if os.path.isdir(root) else []
    if not steps:
      return None
    step = max(steps)
  path = os.path.join(root, str(step))
  return path if os.path.isdir(path) else None


def _mib(n: int) -> str:
  return f"{n / 2**20:.3f} MiB"


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m irnet_jax.export", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="the --workdir of a training run")
  parser.add_argument("--out", required=True, help="packed model file to write")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
  parser.add_argument("--no-check", dest="check", action="store_false",
                      help="skip comparing packed inference with the float model")
  parser.add_argument("--debug", action="store_true",
                      help=f"show the traceback of an error (or {workdir_lib.DEBUG_ENV}=1)")
  args = parser.parse_args(argv)
  with workdir_lib.cli_errors(workdir_lib.debug_requested(args.debug)):
    return _export(args)


def _export(args: argparse.Namespace) -> int:
  """Restores, packs, writes and checks; prints the sizes (see the module docstring)."""
  out_dir = os.path.dirname(os.path.abspath(args.out))
  if not os.path.isdir(out_dir):  # Said before minutes of restoring and packing.
    raise FileNotFoundError(2, "the directory of --out does not exist", out_dir)
  # Imported here: restoring needs Orbax, which the rest of the export package does not.
  # pylint: disable-next=import-outside-toplevel
  from irnet_jax import checkpointing, config as config_lib

  model, config = checkpointing.load_model(args.workdir, args.step)
  kwargs = {k: (v if v is None or isinstance(v, (int, float, str)) else str(v))
            for k, v in config_lib.model_kwargs(config).items()}
  packed = pack(model, name=config.model.name, kwargs=kwargs,
                config=json.loads(config.to_json()))
  file_bytes = save(packed, args.out)

  float_bytes = float32_param_bytes(model)
  binary = packed.binary_layers()
  bits_bytes = sum(packed.arrays[f"{n}/{f}"].nbytes for n in binary
                   for f in ("sign", "exp", "nonzero") if f"{n}/{f}" in packed.arrays)
  ckpt = _checkpoint_dir(args.workdir, args.step)
  ckpt_bytes = None
  if ckpt is not None:
    model_dir = os.path.join(ckpt, "model")
    ckpt_bytes = _dir_bytes(model_dir if os.path.isdir(model_dir) else ckpt)
  report = {
      "model": config.model.name, "out": args.out,
      "float32_params_bytes": float_bytes,
      "checkpoint_dir": ckpt, "checkpoint_model_bytes": ckpt_bytes,
      "packed_file_bytes": file_bytes,
      "packed_binary_layer_bytes": bits_bytes, "binary_layers": len(binary),
      "ratio_float32_params_to_file": round(float_bytes / file_bytes, 2),
  }
  print(f"model {config.model.name}: {len(binary)} binary conv layers")
  print(f"  float32 parameters : {_mib(float_bytes)}")
  if ckpt_bytes is not None:
    print(f"  float checkpoint   : {_mib(ckpt_bytes)}  ({ckpt})")
  print(f"  packed file        : {_mib(file_bytes)}  ({args.out}; "
        f"{float_bytes / file_bytes:.1f}x smaller than float32 parameters)")
  print(f"  of which bit-packed binary layers: {_mib(bits_bytes)}")

  if args.check:
    size = int(config.dataset.image_size)  # The resolution the model was trained at.
    x = jax.random.normal(jax.random.key(0), (2, size, size, packed.meta["in_channels"]))
    ref, out = model(x), infer(packed, x)
    diff = float(jnp.max(jnp.abs(ref - out)))
    same = bool(np.all(np.asarray(ref.argmax(-1)) == np.asarray(out.argmax(-1))))
    report.update(check_max_abs_diff=diff, check_same_argmax=same)
    print(f"  check (2 random {size}x{size} images): max |logit diff| {diff:.3g}, "
          f"same argmax: {same}")
  print(json.dumps(report))
  return 0


if __name__ == "__main__":
  sys.exit(main())
