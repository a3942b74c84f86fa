"""Evaluates the newest checkpoint of a workdir on its dataset, without training.

  python -m irnet_jax.evaluate --workdir=DIR [--config.a.b=value ...]

The config is ``DIR/config.json``; ``--config.*`` overrides it, e.g.
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
import sys

import jax
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from irnet_jax import checkpointing, config as config_lib, data, kernels, train
from irnet_jax import workdir as workdir_lib

EVAL_FILE = "eval_metrics.json"
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a training run or of irnet_jax.convert.")


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict | None = None,
                     conv_impl: str = "auto") -> dict:
  """Evaluates ``workdir``'s newest readable checkpoint; writes and returns the metrics.

  ``config``: None = ``workdir/config.json``; a given config must build the same model
  (checked against the checkpoint's shapes before anything is evaluated).
  ``conv_impl``: the convolution backend, resolved for this host's devices ("auto":
  the fastest that runs here); ``config.model.conv_impl`` (the training host's) is
  not used.
  """
  c = ml_collections.ConfigDict((config or checkpointing.load_config(workdir)).to_dict())
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
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  try:
    restored = ckpt.restore_latest(setup.state[0])
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f"no checkpoint in {ckpt.directory}; train or convert first.")
  model_state, _, meta = restored
  result = train.evaluate(setup.eval_step, model_state, c, setup.batch_sharding)
  out = dict(test_accuracy=result["accuracy"], test_loss=result["loss"],
             test_examples=result["count"])
  if c.model.num_classes > 10:
    out["test_top5_accuracy"] = result["top5_accuracy"]
  out.update(step=int(meta["step"]), model=c.model.name,
             dataset=dict(name=c.dataset.name, path=c.dataset.get("path", "")))
  if meta.get("imported"):
    out["imported"] = meta["imported"]
  if jax.process_index() == 0:
    checkpointing.write_json_atomic(os.path.join(workdir, EVAL_FILE), out)
  return out


def _workdir_from(argv: list[str]) -> str | None:
  """``--workdir`` before absl parses flags (the config flag's default depends on it)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--workdir="):
      return arg.split("=", 1)[1]
    if arg == "--workdir" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _conv_impl_from(argv: list[str]) -> str:
  """The backend asked for with ``--config.model.conv_impl`` (else "auto": the recorded
  one is the training host's)."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config.model.conv_impl="):
      return arg.split("=", 1)[1]
    if arg == "--config.model.conv_impl" and i + 1 < len(argv):
      return argv[i + 1]
  return "auto"


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.WARNING)
  with workdir_lib.cli_errors(_DEBUG):
    out = evaluate_workdir(FLAGS.workdir, FLAGS.config, _conv_impl_from(sys.argv[1:]))
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in out.items() if k != "dataset"))
  print(f"wrote {os.path.join(FLAGS.workdir, EVAL_FILE)}")


_DEBUG = False  # --debug / IRNET_JAX_DEBUG=1: tracebacks instead of one-line errors.

if __name__ == "__main__":
  _DEBUG = workdir_lib.pop_debug_flag(sys.argv)
  _workdir = _workdir_from(sys.argv[1:])
  if _workdir is None:
    sys.exit("error: --workdir=DIR is required (a training or irnet_jax.convert workdir).")
  with workdir_lib.cli_errors(_DEBUG):
    _config = checkpointing.load_config(_workdir)
  config_flags.DEFINE_config_dict("config", _config, "The workdir's config; override "
                                  "fields with --config.a.b=value.", lock_config=True)
  app.run(main)
