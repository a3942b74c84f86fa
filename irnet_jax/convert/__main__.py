"""Official PyTorch checkpoints in and out of workdirs.

  python -m irnet_jax.convert --torch=model.th --config=NAME --workdir=W
      [--config.a.b=value ...]
  python -m irnet_jax.convert --workdir=W --to_torch=out.pth [--step=N]

(``--debug`` or ``IRNET_JAX_DEBUG=1``: tracebacks instead of one-line errors.)

The first writes W as a normal workdir (see :mod:`irnet_jax.convert.workdir`) from a
file saved by the official trainers (``{'state_dict': ..., 'best_prec1': ...}``, keys
with DataParallel's ``module.``) or a bare ``state_dict``. The second writes W's newest
model state as a bare state_dict that the official model's ``load_state_dict`` accepts
(``strict=True``). This command is the only part of irnet_jax that needs torch; files are
read with ``torch.load(..., weights_only=True)``, which never runs pickled code.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Sequence

import numpy as np
from absl import app, flags

from irnet_jax import cli, configs

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("torch", None, "Official PyTorch checkpoint to import (.th/.pth).")
  configs.define_flag("config", "Experiment config of the model (with --torch): a "
                      "packaged recipe's name or a config file's path.")
  flags.DEFINE_string("workdir", None, "Workdir to write (with --torch) or read.")
  flags.DEFINE_string("to_torch", None, "Write the workdir's model as a torch state_dict "
                      "here.")
  flags.DEFINE_integer("step", None, "Checkpoint to export with --to_torch (default: "
                       "newest).")
  flags.mark_flag_as_required("workdir")


def _torch():
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    sys.exit("error: python -m irnet_jax.convert reads and writes PyTorch files and needs "
             "torch: pip install torch --index-url https://download.pytorch.org/whl/cpu "
             "(the CPU build; plain `pip install torch` brings GBs of CUDA libraries). "
             "Nothing else in irnet_jax needs it.")
  return torch


def _to_numpy(obj: Any) -> Any:
  """Tensors -> numpy arrays, through dicts (state_dicts, checkpoint dicts)."""
  torch = _torch()
  if isinstance(obj, dict):
    return {k: _to_numpy(v) for k, v in obj.items()}
  if torch.is_tensor(obj):
    return obj.detach().cpu().numpy()
  return obj


def read_torch_file(path: str) -> dict:
  """``torch.load(path, weights_only=True)`` with tensors as numpy arrays."""
  torch = _torch()
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except FileNotFoundError:
    sys.exit(f"error: --torch={path} does not exist.")
  except Exception as e:  # pylint: disable=broad-except
    sys.exit(f"error: cannot read {path} with torch.load(weights_only=True) "
             f"({type(e).__name__}: {e}). Only tensors and plain containers are read (no "
             "pickled code); re-save it with torch.save({'state_dict': "
             "model.state_dict()}, path).")
  if not isinstance(obj, dict):
    sys.exit(f"error: {path} holds a {type(obj).__name__}, not a state_dict or a "
             "checkpoint dict.")
  return _to_numpy(obj)


def write_torch_file(state_dict: dict[str, np.ndarray], path: str) -> None:
  torch = _torch()
  torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
             path)


def main(argv: Sequence[str]) -> None:
  """Imports ``--torch`` into ``--workdir``, or exports it to ``--to_torch``."""
  del argv  # cli.run refuses positional arguments.
  logging.getLogger().setLevel(logging.WARNING)  # Keep Orbax's INFO chatter out.
  if not FLAGS.torch and not FLAGS.to_torch:
    raise app.UsageError("give --torch=FILE --config=... (import) or --to_torch=FILE "
                         "(export).")
  if FLAGS.torch and FLAGS.config is None:
    raise app.UsageError("--torch needs --config=NAME (the model's recipe) or "
                         "--config=FILE.py.")
  _torch()  # Before anything else: a missing torch is the first thing to hear about.
  if FLAGS.torch:
    _import_torch_file()
  else:
    _export_torch_file()


def _import_torch_file() -> None:
  """``--torch`` -> a new workdir ``--workdir`` (model of ``--config``)."""
  # pylint: disable-next=import-outside-toplevel
  from irnet_jax.convert import workdir as workdir_lib  # After the flags: JAX is heavy.
  meta = workdir_lib.import_state_dict(read_torch_file(FLAGS.torch), FLAGS.config,
                                       FLAGS.workdir, source=FLAGS.torch)
  print(f"imported {FLAGS.torch} ({meta['model']}, {meta['num_classes']} classes"
        + "".join(f", {k}={v}" for k, v in meta["official"].items())
        + f") into {FLAGS.workdir}")


def _export_torch_file() -> None:
  """``--workdir``'s model state (``--step``) -> the state_dict file ``--to_torch``."""
  # pylint: disable-next=import-outside-toplevel
  from irnet_jax.convert import workdir as workdir_lib  # After the flags: JAX is heavy.
  state_dict = workdir_lib.export_state_dict(FLAGS.workdir, FLAGS.step)
  write_torch_file(state_dict, FLAGS.to_torch)
  print(f"wrote {FLAGS.to_torch}: {len(state_dict)} tensors (official key names, "
        "load_state_dict-ready)")


if __name__ == "__main__":
  cli.run(main, define_flags)
