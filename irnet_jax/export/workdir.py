"""A training run's checkpoint -> a packed model file, with the sizes and a check.

:func:`export_workdir` restores ``DIR/checkpoints/<step>/`` with
:func:`irnet_jax.checkpointing.load_model`, packs it, writes the file and returns a
report: float32 parameters, the checkpoint on disk (model state only where Orbax stores
it separately) and the packed file; with ``check``, the largest logit difference between
the packed model and the float model's eval forward on two random images at the
training resolution. The model is built for this host's devices whatever backend the
run was trained with. ``python -m irnet_jax.export`` is its command line.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from irnet_jax.export.format import save
from irnet_jax.export.infer import infer
from irnet_jax.export.pack import PackedModel, float32_param_bytes, pack


def export_workdir(workdir: str, out: str, step: int | None = None,
                   check: bool = True) -> dict[str, Any]:
  """Packs ``workdir``'s checkpoint ``step`` (None: the newest) into ``out``; returns the
  report (see the module docstring). Raises FileNotFoundError before restoring anything
  when the directory of ``out`` does not exist."""
  out_dir = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(out_dir):  # Said before minutes of restoring and packing.
    raise FileNotFoundError(2, "the directory of --out does not exist", out_dir)
  # Imported here: restoring needs Orbax, which the rest of the export package does not.
  # pylint: disable-next=import-outside-toplevel
  from irnet_jax import checkpointing
  from irnet_jax import config as config_lib

  model, config = checkpointing.load_model(workdir, step)
  kwargs = {k: (v if v is None or isinstance(v, (int, float, str)) else str(v))
            for k, v in config_lib.model_kwargs(config).items()}
  packed = pack(model, name=config.model.name, kwargs=kwargs,
                config=json.loads(config.to_json()))
  report = _sizes(model, packed, save(packed, out), _checkpoint_dir(workdir, step))
  report.update(model=config.model.name, out=out)
  if check:
    report.update(_check(model, packed, int(config.dataset.image_size)))
  return report


def _sizes(model: Any, packed: PackedModel, file_bytes: int,
           ckpt: str | None) -> dict[str, Any]:
  """The size entries of the report."""
  float_bytes = float32_param_bytes(model)
  binary = packed.binary_layers()
  convs = sum(1 for i in packed.program if i.get("name") in binary and i["op"] == "conv")
  bits_bytes = sum(packed.arrays[f"{n}/{f}"].nbytes for n in binary
                   for f in ("sign", "exp", "nonzero") if f"{n}/{f}" in packed.arrays)
  ckpt_bytes = None
  if ckpt is not None:
    model_dir = os.path.join(ckpt, "model")
    ckpt_bytes = _dir_bytes(model_dir if os.path.isdir(model_dir) else ckpt)
  return {"float32_params_bytes": float_bytes,
          "checkpoint_dir": ckpt, "checkpoint_model_bytes": ckpt_bytes,
          "packed_file_bytes": file_bytes,
          "packed_binary_layer_bytes": bits_bytes, "binary_layers": len(binary),
          "binary_convs": convs, "binary_denses": len(binary) - convs,
          "ratio_float32_params_to_file": round(float_bytes / file_bytes, 2)}


def _check(model: Any, packed: PackedModel, size: int) -> dict[str, Any]:
  """Packed vs float logits on two random ``size`` x ``size`` images."""
  x = jax.random.normal(jax.random.key(0), (2, size, size, packed.meta["in_channels"]))
  ref, got = model(x), infer(packed, x)
  return {"check_image_size": size,
          "check_max_abs_diff": float(jnp.max(jnp.abs(ref - got))),
          "check_same_argmax": bool(np.all(np.asarray(ref.argmax(-1))
                                           == np.asarray(got.argmax(-1))))}


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
