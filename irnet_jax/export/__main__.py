"""Exports the latest (or a given) checkpoint of a training run as a packed model.

  python -m irnet_jax.export --workdir=DIR --out=FILE [--step=N] [--nocheck] [--debug]

Restores ``DIR/checkpoints/<step>/``, packs it, writes FILE and prints the sizes: float32
parameters, the checkpoint on disk and the packed file; then (unless ``--nocheck``) the
largest logit difference between the packed model and the float model on two random
images; last, the whole report as one JSON line (:func:`irnet_jax.export.workdir.
export_workdir`). Errors are one ``error: ...`` line and exit status 1 (``--debug`` or
``IRNET_JAX_DEBUG=1``: the traceback).
"""
from __future__ import annotations

import json
from typing import Any, Sequence

from absl import flags

from irnet_jax import cli
from irnet_jax.export.workdir import export_workdir

FLAGS = flags.FLAGS


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "The --workdir of a training run.")
  flags.DEFINE_string("out", None, "Packed model file to write.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
  flags.DEFINE_bool("check", True, "Compare packed inference with the float model on "
                    "two random images (--nocheck: skip).")
  flags.mark_flags_as_required(["workdir", "out"])


def format_report(report: dict[str, Any]) -> str:
  """The human-readable lines of an export report, then the report as one JSON line."""
  floats, packed = report["float32_params_bytes"], report["packed_file_bytes"]
  lines = [f"model {report['model']}: {_count(report['binary_convs'], 'binary conv')}, "
           f"{_count(report['binary_denses'], 'binary dense layer')}",
           f"  float32 parameters : {_mib(floats)}"]
  if report["checkpoint_model_bytes"] is not None:
    lines.append(f"  float checkpoint   : {_mib(report['checkpoint_model_bytes'])}  "
                 f"({report['checkpoint_dir']})")
  lines += [f"  packed file        : {_mib(packed)}  ({report['out']}; "
            f"{floats / packed:.1f}x smaller than float32 parameters)",
            f"  of which bit-packed binary layers: {_mib(report['packed_binary_layer_bytes'])}"]
  if "check_max_abs_diff" in report:
    size = report["check_image_size"]
    lines.append(f"  check (2 random {size}x{size} images): max |logit diff| "
                 f"{report['check_max_abs_diff']:.3g}, same argmax: "
                 f"{report['check_same_argmax']}")
  return "\n".join(lines + [json.dumps(report)])


def _count(n: int, what: str) -> str:
  return f"{n} {what}{'' if n == 1 else 's'}"


def _mib(n: int) -> str:
  return f"{n / 2**20:.3f} MiB"


def main(argv: Sequence[str]) -> None:
  """Exports ``--workdir`` into ``--out`` and prints the report."""
  del argv  # cli.run refuses positional arguments.
  print(format_report(export_workdir(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.check)))


if __name__ == "__main__":
  cli.run(main, define_flags)
