"""Orbax checkpoints of a training run (the only module that imports orbax).

Layout: ``WORKDIR/checkpoints/<step>/{model,opt,meta}`` written by an Orbax
``CheckpointManager`` (atomic: a step directory only counts once committed), and
``WORKDIR/config.json``, the run's config (``model.num_classes`` resolved), so
that :func:`load_model` can rebuild the network without the config file.

* ``model``: the NNX model state (params and BN statistics).
* ``opt``: the optimizer state (momentum buffers, step counter).
* ``meta``: JSON -- ``step``, ``seed``, ``data_position`` (the index of the next
  training batch; the input pipeline is a pure function of seed and position),
  ``num_classes``, ``steps_per_epoch``.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from irnet_jax import config as config_lib

CONFIG_FILE = "config.json"
log = logging.getLogger(__name__)


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree`` for restoring onto the same placement."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


class Checkpointer:
  """Saves and restores ``(model_state, opt_state, meta)`` under ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, model_state: Any, opt_state: Any, meta: dict) -> None:
    """Starts an (asynchronous) save of step ``step``; see :meth:`wait`."""
    self._manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model_state), opt=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, model_state: Any, opt_state: Any | None = None
              ) -> tuple[Any, Any, dict]:
    """Restores step ``step`` onto the shapes/shardings of the given (template) states."""
    items = dict(model=ocp.args.StandardRestore(_abstract(model_state)),
                 meta=ocp.args.JsonRestore())
    if opt_state is not None:
      items["opt"] = ocp.args.StandardRestore(_abstract(opt_state))
    restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    opt = restored["opt"] if opt_state is not None else None
    return restored["model"], opt, dict(restored["meta"])

  def restore_latest(self, model_state: Any, opt_state: Any | None = None
                     ) -> tuple[Any, Any, dict] | None:
    """The newest readable checkpoint, or None if there is none.

    An unreadable newest checkpoint (corrupt or truncated files) is reported with a
    warning and the previous one is tried, so one bad write never ends a run.
    """
    for step in reversed(self.all_steps()):
      try:
        return self.restore(step, model_state, opt_state)
      except Exception as e:  # Orbax raises many types for damaged files.
        log.warning("checkpoint %d in %s is unreadable (%s: %s); falling back to the "
                        "previous one.", step, self.directory, type(e).__name__, e)
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no {CONFIG_FILE}; is it the --workdir of a training "
                     "run made with `python -m irnet_jax.main`?")
  with open(path) as f:
    return config_lib.migrate(ml_collections.ConfigDict(json.load(f)))


def load_model(workdir: str, step: int | None = None
               ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """The model of a training run, restored from ``WORKDIR/checkpoints`` in eval mode.

  Args:
    workdir: the ``--workdir`` of ``python -m irnet_jax.main``.
    step: which checkpoint; None = the newest readable one.

  Returns:
    ``(model, config)`` with ``model.eval()`` already called.
  """
  config = load_config(workdir)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
  steps = ckpt.all_steps()
  if not steps:
    raise ValueError(f"no checkpoint in {ckpt.directory}; train first (or check --workdir).")
  if step is not None and step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {ckpt.directory}; have {steps}.")
  model = config_lib.build_model(config)
  template = nnx.state(model)
  if step is None:
    restored = ckpt.restore_latest(template)
    if restored is None:
      raise ValueError(f"no readable checkpoint in {ckpt.directory}.")
  else:
    restored = ckpt.restore(step, template)
  nnx.update(model, restored[0])
  model.eval()
  ckpt.close()
  return model, config

