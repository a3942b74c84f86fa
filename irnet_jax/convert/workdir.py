"""Official PyTorch weights <-> a workdir (no torch needed here: arrays are numpy).

:func:`import_state_dict` makes a normal workdir from official weights: ``config.json``,
``run.json`` and an Orbax checkpoint at step 0 (the converted model state and a fresh
optimizer state) whose meta says ``imported``. Everything that reads workdirs takes it:
``python -m irnet_jax.evaluate``, ``python -m irnet_jax.export``, ``report`` (after
an evaluation), and training, in two ways:

* ``python -m irnet_jax.main --config=<the same config> --workdir=W`` continues W as a
  run whose step 0 is the imported model (the full schedule from step 0);
* ``python -m irnet_jax.main --config=<any config of the same model> --workdir=NEW
  --config.init_from=W`` fine-tunes in a new workdir: the model state of W's newest
  checkpoint, a fresh optimizer, the new config's schedule. W is only read.

:func:`export_state_dict` is the reverse: a workdir's newest model state as an official
(bare, ``load_state_dict``-ready) state_dict.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import ml_collections
import numpy as np
import optax
from flax import nnx

from irnet_jax import checkpointing, convert, optim, run_record
from irnet_jax import config as config_lib

CLASSIFIER_KEYS = ("linear.weight", "fc.weight")  # CIFAR ResNets / ImageNet and VGG.


def _num_classes(state_dict: Mapping[str, Any]) -> int:
  for key in CLASSIFIER_KEYS:
    if key in state_dict:
      return int(np.shape(state_dict[key])[0])
  raise ValueError(f"cannot tell the number of classes: none of {list(CLASSIFIER_KEYS)} is "
                   "in the state_dict; set --config.model.num_classes.")


def import_state_dict(obj: Mapping[str, Any], config: ml_collections.ConfigDict,
                      workdir: str, source: str = "") -> dict:
  """Writes ``workdir`` from official weights; returns the checkpoint's meta.

  Args:
    obj: what ``torch.load`` returned, tensors as numpy arrays: a state_dict or an
      official checkpoint dict (``{'state_dict': ..., 'best_prec1': ...}``, keys with
      or without ``module.``).
    config: the experiment config of the model (e.g. ``irnet_jax.configs.get_config(NAME)``);
      ``model.num_classes <= 0`` is taken from the classifier's weight.
    workdir: a new (or empty) directory.
    source: recorded as ``imported`` in the meta (the file's path).

  Raises ``ValueError`` before writing anything if the workdir already holds a run or
  the weights do not fit the model (every missing, unknown or mis-shaped key named).
  """
  state_dict, extras = convert.official_state_dict(obj)
  c = ml_collections.ConfigDict(config.to_dict())
  if c.model.num_classes <= 0:
    c.model.num_classes = _num_classes(state_dict)
  config_lib.validate(c)
  if run_record.read_run(workdir) is not None or (
      os.path.isdir(os.path.join(workdir, "checkpoints"))
      and os.listdir(os.path.join(workdir, "checkpoints"))):
    raise ValueError(f"{workdir} already holds a run; import into a new --workdir.")
  model = config_lib.build_model(c)
  convert.load_torch_state_dict(model, state_dict)
  # The optimizer's state has the same tree whatever the schedule: a fresh one at step 0.
  optimizer = nnx.Optimizer(model, optim.make_optimizer(c, optax.constant_schedule(0.0), model),
                            wrt=nnx.Param)
  spec = run_record.run_spec(c)
  meta = dict(step=0, seed=c.seed, model=c.model.name, data_position=0,
              num_classes=c.model.num_classes, train_seconds=0.0,
              run_fingerprint=run_record.run_fingerprint(spec),
              imported=os.path.abspath(source) if source else "state_dict",
              official=extras)
  os.makedirs(workdir, exist_ok=True)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  try:
    ckpt.save(0, nnx.state(model), nnx.state(optimizer), meta)
    ckpt.wait()
  finally:
    ckpt.close()
  run_record.record_run(workdir, c)
  return meta


def export_state_dict(workdir: str, step: int | None = None) -> dict[str, np.ndarray]:
  """The model state of ``workdir``'s newest (or ``step``) checkpoint as an official
  state_dict: torch keys and layouts (OIHW kernels), no ``module.`` prefix."""
  model, _ = checkpointing.load_model(workdir, step)
  return convert.to_torch_state_dict(nnx.state(model))
