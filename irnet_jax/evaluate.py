"""Evaluates the newest checkpoint of a workdir on its dataset, without training.

  python -m irnet_jax.evaluate --workdir=DIR [--config.a.b=value ...]

The config is ``DIR/config.json``; ``--config.*`` overrides its fields, e.g.
``--config.dataset.name=npz --config.dataset.path=test.npz`` to evaluate on other
images. Uses the training loop's own evaluation (:func:`irnet_jax.train.evaluate`
over the same jitted eval step and mesh), prints the result and writes
``DIR/eval_metrics.json``: ``test_accuracy``, ``test_loss``, ``test_examples``
(``test_top5_accuracy`` too when there are more than 10 classes), ``step``,
``model``, ``dataset`` and, for a workdir made by ``irnet_jax.convert``, ``imported``.

The convolution backend is picked for this host (``conv_impl="auto"``), not the one
config.json records: a workdir trained with the CPU kernels evaluates on a GPU or on a
CPU without them (every backend computes the same function). ``--config.model.
conv_impl=NAME`` asks for one. Errors are one ``error: ...`` line (``--debug`` or
``IRNET_JAX_DEBUG=1``: the traceback).
"""
from __future__ import annotations

import logging
import os
from typing import Any, Sequence

if __name__ == "__main__":  # Before the imports that need it: one line naming the extra.
  from irnet_jax import workdir as _workdir
  _workdir.run_tool_needing("train", "python -m irnet_jax.evaluate")

import jax  # pylint: disable=wrong-import-position
import ml_collections
from absl import flags
from ml_collections import config_flags

from irnet_jax import checkpointing, cli, data, kernels, run_record, train
from irnet_jax import config as config_lib
from irnet_jax import workdir as workdir_lib

EVAL_FILE = "eval_metrics.json"
FLAGS = flags.FLAGS


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict | None = None,
                     conv_impl: str = "auto", write: bool = True) -> dict:
  """Evaluates ``workdir``'s newest readable, verified checkpoint (its ``step`` is in the
  result); returns the metrics and, with ``write``, writes them (:func:`write_result`).

  ``config``: None = ``workdir/config.json``; a given config must build the same model
  (checked against the checkpoint's shapes before anything is evaluated).
  ``conv_impl``: the convolution backend, resolved for this host's devices ("auto":
  the fastest that runs here); ``config.model.conv_impl`` (the training host's) is
  not used.
  """
  c = ml_collections.ConfigDict((config or run_record.load_config(workdir)).to_dict())
  if c.get("num_devices", -1) > jax.device_count():
    # The training host's device count; evaluation pads and masks its batches, so any
    # number of devices gives the same result.
    logging.getLogger(__name__).warning(
        "config.num_devices=%d but this host has %d devices; evaluating on all of them.",
        c.num_devices, jax.device_count())
    c.num_devices = -1
  devices = train.select_devices(c.get("num_devices", -1))
  c.model.conv_impl = kernels.resolve(conv_impl, devices)
  config_lib.validate(c, len(devices))
  info = data.dataset_info(c.dataset)
  if info.num_classes > c.model.num_classes:
    raise ValueError(f"the dataset has {info.num_classes} classes but the model of "
                     f"{workdir} predicts {c.model.num_classes}; evaluate on a dataset "
                     "with the model's classes.")
  setup = train.build(c, devices, 1, 1)
  # Onto the model state as the eval step's mesh places it.
  model_state, meta = checkpointing.restore_model(workdir, setup.state[0])
  result = train.evaluate(setup.eval_step, model_state, c, setup.batch_sharding)
  out = dict(test_accuracy=result["accuracy"], test_loss=result["loss"],
             test_examples=result["count"])
  if c.model.num_classes > 10:
    out["test_top5_accuracy"] = result["top5_accuracy"]
  out.update(step=int(meta["step"]), model=c.model.name,
             dataset=dict(name=c.dataset.name, path=c.dataset.get("path", "")))
  if meta.get("imported"):
    out["imported"] = meta["imported"]
  if write:
    write_result(workdir, out)
  return out


def write_result(workdir: str, out: dict) -> str:
  """Writes ``out`` to ``workdir/eval_metrics.json`` (process 0); returns the path."""
  path = os.path.join(workdir, EVAL_FILE)
  if jax.process_index() == 0:
    workdir_lib.write_json_atomic(path, out)
  return path


def define_flags() -> None:
  """``--workdir`` and ``--config.a.b=value`` overrides of the workdir's config (checked
  against :func:`irnet_jax.config.base_config`, whose fields every workdir has)."""
  flags.DEFINE_string("workdir", None, "Workdir of a training run or of irnet_jax.convert.")
  flags.mark_flag_as_required("workdir")
  config_flags.DEFINE_config_dict(
      "config", config_lib.base_config(), "Overrides of the workdir's config.json: "
      "--config.a.b=value (e.g. --config.dataset.path=other.npz).", lock_config=True)
  FLAGS["config"].default_as_str = "the workdir's config.json"  # Not base_config's dump.


def overridden_config(workdir: str) -> tuple[ml_collections.ConfigDict, str]:
  """(``workdir``'s config with the ``--config.*`` overrides, the conv backend to use:
  the overridden ``model.conv_impl``, else "auto" (the recorded one is the training
  host's))."""
  c = run_record.load_config(workdir)
  overrides: dict[str, Any] = config_flags.get_override_values(FLAGS["config"])
  c.update_from_flattened_dict(overrides)
  return c, overrides.get("model.conv_impl", "auto")


def main(argv: Sequence[str]) -> None:
  """Evaluates ``--workdir``; prints the metrics and where they were written."""
  del argv  # cli.run refuses positional arguments.
  logging.getLogger().setLevel(logging.WARNING)
  config, conv_impl = overridden_config(FLAGS.workdir)
  out = evaluate_workdir(FLAGS.workdir, config, conv_impl, write=False)
  # The result first: a workdir it cannot write to (read-only, full) still gets it.
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in out.items() if k != "dataset"), flush=True)
  print(f"wrote {write_result(FLAGS.workdir, out)}")


if __name__ == "__main__":
  cli.run(main, define_flags)
