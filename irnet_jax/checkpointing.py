"""The workdir of a run: Orbax checkpoints, config and run identity (the only module
that imports orbax).

Layout: ``WORKDIR/checkpoints/<step>/{model,opt,meta}`` written by an Orbax
``CheckpointManager`` (atomic: a step directory only counts once committed),
``WORKDIR/config.json``, the run's config (``model.num_classes`` resolved), so
that :func:`load_model` can rebuild the network without the config file, and
``WORKDIR/run.json``, the run's identity (see :func:`run_spec`): every config field
that defines the run, so that a restart with another config is refused before
anything in the workdir changes (:func:`check_run`).

* ``model``: the NNX model state (params and BN statistics).
* ``opt``: the optimizer state (momentum buffers, step counter).
* ``meta``: JSON -- ``step``, ``seed``, ``data_position`` (the index of the next
  training batch; the input pipeline is a pure function of seed and position),
  ``num_classes``, ``steps_per_epoch``, ``run_fingerprint`` (of :func:`run_spec`),
  and ``imported`` (the source file) for checkpoints made by ``irnet_jax.convert``.

A checkpoint that cannot be read (damaged or truncated files) is skipped with a
warning in favour of the previous one of the same run; one that can be read but
belongs to another run or does not fit the model (other tree or shapes) raises
:class:`IncompatibleCheckpointError` instead: it is never "unreadable". A training run
that resumes past damaged checkpoints moves them to
``WORKDIR/checkpoints/.damaged/<step>-<UTC time>/`` (never deleted), so that it saves
those steps again and every reader finds them (:meth:`Checkpointer.restore_latest`).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from irnet_jax import config as config_lib
from irnet_jax import workdir as workdir_lib

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
DAMAGED_DIR = ".damaged"  # Under checkpoints/: damaged checkpoints moved aside.
log = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint of another run, or one that does not fit the model."""


class RunMismatchError(ValueError):
  """A restart whose config differs from the run recorded in its workdir."""


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree`` for restoring onto the same placement."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)


def _flat_shapes(tree: Any) -> dict[str, tuple]:
  """``{'layer1.0.conv1.kernel.value': shape}`` of a state or of Orbax tree metadata."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def _tree_mismatch(item: str, saved: Any, template: Any) -> list[str]:
  """Human-readable differences between a checkpoint item's metadata and a template."""
  have, want = _flat_shapes(saved), _flat_shapes(template)
  out = []
  extra, missing = sorted(have.keys() - want.keys()), sorted(want.keys() - have.keys())
  if extra:
    out.append(f"{item}: {len(extra)} entries the model does not have, e.g. {extra[:3]}")
  if missing:
    out.append(f"{item}: {len(missing)} entries of the model missing, e.g. {missing[:3]}")
  shapes = [f"{k} {have[k]} vs {want[k]}" for k in sorted(have.keys() & want.keys())
            if have[k] != want[k]]
  if shapes:
    out.append(f"{item}: {len(shapes)} shapes differ (checkpoint vs model), e.g. {shapes[:3]}")
  return out


class Checkpointer:
  """Saves and restores ``(model_state, opt_state, meta)`` under ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 3, create: bool = True):
    """``create=False`` for readers: a workdir without checkpoints is left as it is."""
    self.directory = os.path.abspath(directory)
    # Handlers named up front so that a fresh manager can read item metadata
    # (tree structure, shapes) without restoring any array.
    handlers = dict(model=ocp.StandardCheckpointHandler(), opt=ocp.StandardCheckpointHandler(),
                    meta=ocp.JsonCheckpointHandler())
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, model_state: Any, opt_state: Any, meta: dict) -> None:
    """Starts an (asynchronous) save of step ``step``; see :meth:`wait`."""
    saved = self._manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model_state), opt=ocp.args.StandardSave(opt_state),
        meta=ocp.args.JsonSave(meta)))
    if not saved:  # Orbax declines a step <= its newest one, silently.
      log.warning("checkpoint %d was not saved: %s already has step %s; steps up to it are "
                  "skipped until the run passes it.", step, self.directory,
                  self._manager.latest_step())

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

  def incompatibilities(self, step: int, model_state: Any, opt_state: Any | None = None,
                        fingerprint: str | None = None) -> list[str]:
    """Why checkpoint ``step`` cannot be restored onto these templates ([] if it can).

    Reads only metadata (the meta JSON, tree structure and shapes); raises whatever
    Orbax raises when even that is unreadable (a damaged checkpoint).
    """
    meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = dict(meta["meta"])
    metadata = self._manager.item_metadata(step)
    items = [("model", model_state)] + ([("opt", opt_state)] if opt_state is not None else [])
    problems = []
    saved = meta.get("run_fingerprint")
    if fingerprint is not None and saved is not None and saved != fingerprint:
      problems.append(f"it was written by another run (model {meta.get('model')!r}, seed "
                      f"{meta.get('seed')}; run fingerprint {saved[:12]} vs {fingerprint[:12]})")
    for item, template in items:
      if metadata.get(item) is None:
        raise ValueError(f"no readable {item!r} metadata")
      problems += _tree_mismatch(item, metadata[item], template)
    return problems

  def restore_latest(self, model_state: Any, opt_state: Any | None = None,
                     fingerprint: str | None = None, repair: bool | None = None
                     ) -> tuple[Any, Any, dict] | None:
    """The newest readable checkpoint (None if there is no checkpoint at all).

    A damaged newest checkpoint (unreadable or truncated files) is reported with a
    warning and the previous one is tried, so one bad write never ends a run. A
    readable checkpoint that does not fit the templates, or whose meta names a
    ``run_fingerprint`` other than ``fingerprint``, raises
    :class:`IncompatibleCheckpointError`; so does a directory where no checkpoint
    can be read (rather than starting over and rotating them away; nothing is moved).

    ``repair``: move the damaged checkpoints newer than the one restored to
    ``.damaged/`` (:meth:`_set_aside`), so that the run saves those steps again
    (Orbax skips a step at or below its newest one). None = when ``opt_state`` is
    given: a training run resuming, which holds the workdir lock. Readers (evaluate,
    export, ``init_from``) only fall back and leave the workdir as it is. With several
    processes, every one must call this (it synchronizes them); process 0 moves.
    """
    repair = opt_state is not None if repair is None else repair
    steps = self.all_steps()
    errors, damaged = [], []
    for step in reversed(steps):
      try:
        problems = self.incompatibilities(step, model_state, opt_state, fingerprint)
      except Exception as e:  # Orbax raises many types for damaged files.
        problems, error = None, e
      if problems:
        raise IncompatibleCheckpointError(
            f"checkpoint {step} in {self.directory} does not belong to this run: "
            + "; ".join(problems) + ". Nothing was changed. Use another --workdir for a "
            "new run, or the config this workdir was trained with (its config.json).")
      if problems is not None:
        try:
          restored = self.restore(step, model_state, opt_state)
        except Exception as e:  # pylint: disable=broad-except
          error = e
        else:
          if repair:
            self._set_aside(damaged, step)
          return restored
      errors.append(f"{step}: {type(error).__name__}: {error}")
      damaged.append(step)
      log.warning("checkpoint %d in %s is unreadable (%s: %s); falling back to the "
                  "previous one.%s", step, self.directory, type(error).__name__, error,
                  "" if repair else " A training run of this workdir (the same command) "
                  "moves it aside and saves the step again.")
    if steps:
      raise IncompatibleCheckpointError(
          f"no checkpoint in {self.directory} can be read ({'; '.join(errors)}). Nothing "
          "was changed; move the directory away (or use another --workdir) to start over.")
    return None

  def _set_aside(self, damaged: list[int], restored: int) -> None:
    """Moves the checkpoints ``damaged`` to ``.damaged/<step>-<UTC time>`` (process 0;
    the others wait for it) and reloads Orbax's list of steps, so that they are saved
    again. Only called once an older checkpoint restored: the storage works, the
    files of these steps do not."""
    multi = jax.process_count() > 1
    if multi:  # Every process has finished reading before anything moves.
      ocp.multihost.sync_global_processes("irnet_jax_damaged_scan")
    if damaged and jax.process_index() == 0:
      stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
      root = os.path.join(self.directory, DAMAGED_DIR)
      for step in damaged:
        source = os.path.join(self.directory, str(step))
        target = os.path.join(root, f"{step}-{stamp}")
        n = 1
        while os.path.exists(target):  # Two repairs of one step in the same second.
          target, n = os.path.join(root, f"{step}-{stamp}-{n}"), n + 1
        try:
          os.makedirs(root, exist_ok=True)
          os.rename(source, target)
        except OSError as e:
          raise workdir_lib.WorkdirError(
              f"checkpoint {step} in {self.directory} is damaged and could not be moved "
              f"aside to {target} ({e.strerror or e}); move it yourself (mv {source} "
              f"{target}) and rerun: the run resumes from step {restored} and saves step "
              f"{step} again.") from e
        log.warning("checkpoint %d moved to %s (damaged; kept for inspection); resuming from "
                    "step %d, step %d will be saved again.", step, target, restored, step)
    if multi:
      ocp.multihost.sync_global_processes("irnet_jax_damaged_moved")
    if damaged:
      self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


# ------------------------------------------------------------------ run identity

# Config fields that may change when a run is resumed, because they do not change
# what is computed: cadence of logs/evals/checkpoints/diagnostics, the eval batch
# (padded and masked), how many readers feed the pipeline, where the same data is
# read from (data moves between machines), which devices share the global batch
# (``batch_size`` is global; BN statistics are over the global batch either way), and
# the convolution backend (a run-time choice; every backend computes the same
# function). Every other field defines the run: changing it on a restart is refused.
RESUMABLE_FIELDS = (
    "progress_bar", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
    "keep_checkpoints", "analysis_every_steps", "eval_batch_size", "num_devices",
    "model.conv_impl", "dataset.data_dir", "dataset.path", "dataset.train_root",
    "dataset.test_root", "dataset.train_list", "dataset.test_list", "dataset.num_threads",
    "dataset.num_workers", "dataset.prefetch_mb", "dataset.skip_bad_files",
    # How the steps are dispatched and watched, not what they compute: K steps per call
    # give the parameters of K single steps.
    "steps_per_call", "steps_per_call_mode", "tensorboard", "profile_steps",
)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def run_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{'model.name': 'resnet20', ...}``: every field of ``config`` (num_classes
  resolved) except :data:`RESUMABLE_FIELDS`, with JSON values (tuples as lists)."""
  flat = _flatten(json.loads(config.to_json()))
  return {k: v for k, v in sorted(flat.items()) if k not in RESUMABLE_FIELDS}


def run_fingerprint(spec: dict[str, Any]) -> str:
  """sha256 of a :func:`run_spec` (stored in every checkpoint's meta)."""
  return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _differences(recorded: dict, now: dict, defaults: dict) -> list[tuple[str, Any, Any]]:
  """(field, recorded, now) for each field that differs. A field only one side has
  (written by an older or newer version) counts as its default when the current
  defaults know it, and is ignored otherwise (a removed field)."""
  missing = object()
  out = []
  for key in sorted(recorded.keys() | now.keys()):
    a, b = recorded.get(key, missing), now.get(key, missing)
    if a is missing or b is missing:
      if key not in defaults:
        continue
      a, b = (defaults[key] if a is missing else a), (defaults[key] if b is missing else b)
    if a != b:
      out.append((key, a, b))
  return out


def read_run(workdir: str) -> dict | None:
  """The run recorded in ``workdir`` (its ``run.json``); None for a new workdir."""
  path = os.path.join(workdir, RUN_FILE)
  if os.path.exists(path):
    if os.path.exists(os.path.join(workdir, CONFIG_FILE)):
      fix = (f"delete it (rm {path}) and relaunch with this workdir's config (its "
             f"{CONFIG_FILE}): the launch writes it again")
    else:
      fix = (f"{workdir} has no {CONFIG_FILE} either: use another --workdir, or delete "
             f"{path} to use this one for the run you launch")
    record = _read_json(path, fix)
    if not isinstance(record, dict) or not isinstance(record.get("fields"), dict):
      raise workdir_lib.WorkdirError(f"{path} is damaged (no 'fields' record of the run); "
                                     f"{fix}.")
    return record
  return None


def check_run(workdir: str, config: ml_collections.ConfigDict,
              derived: dict[str, Any] | None = None) -> None:
  """Raises :class:`RunMismatchError` if ``workdir`` records another run than ``config``.

  Reads only; compares :func:`run_spec` field by field, and the ``derived``
  quantities (``num_train_examples``, ``steps_per_epoch``, ``total_steps``) that both
  sides know. The message names every differing field and both fixes.
  """
  recorded = read_run(workdir)
  if recorded is None:
    return
  defaults = run_spec(config_lib.base_config())
  diffs = _differences(recorded["fields"], run_spec(config), defaults)
  old_derived, new_derived = recorded.get("derived") or {}, derived or {}
  diffs += [(k, old_derived[k], new_derived[k]) for k in sorted(old_derived.keys() &
                                                                new_derived.keys())
            if old_derived[k] != new_derived[k]]
  if not diffs:
    return
  lines = "\n".join(f"  {k}: {a!r} (recorded) vs {b!r} (now)" for k, a, b in diffs)
  fixes = " ".join(f"--config.{k}={_flag_value(a)}" for k, a, _ in diffs
                   if k in recorded["fields"])
  raise RunMismatchError(
      f"{workdir} holds another run: its config differs in {len(diffs)} field(s) that "
      f"define a run:\n{lines}\nNothing in {workdir} was changed. To start a new run, "
      f"use another --workdir; to resume this one, use its original values"
      + (f" ({fixes})" if fixes else "") + f" or its config ({workdir}/{CONFIG_FILE}). "
      f"Fields that may change on resume: {', '.join(RESUMABLE_FIELDS)}.")


def _flag_value(v: Any) -> str:
  if isinstance(v, list):
    return "(" + ",".join(map(str, v)) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def record_run(workdir: str, config: ml_collections.ConfigDict,
               derived: dict[str, Any] | None = None) -> str:
  """Writes ``config.json`` and ``run.json`` (call after :func:`check_run` passed);
  returns the run fingerprint. ``derived`` already recorded is kept."""
  spec = run_spec(config)
  old = read_run(workdir) or {}
  derived = {**(old.get("derived") or {}), **(derived or {})}
  fingerprint = run_fingerprint(spec)
  save_config(workdir, config)
  record = dict(fingerprint=fingerprint, fields=spec, derived=derived,
                resumable_fields=list(RESUMABLE_FIELDS))
  _write_atomic(os.path.join(workdir, RUN_FILE), json.dumps(record, indent=2))
  return fingerprint


def _read_json(path: str, fix: str) -> Any:
  """``path``'s JSON; a damaged file is a :class:`~irnet_jax.workdir.WorkdirError`
  naming it and ``fix``."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise workdir_lib.WorkdirError(f"{path} is damaged (not JSON: {e}); {fix}.") from e


def _write_atomic(path: str, text: str) -> None:
  """Readers (other processes of the run) see the old file or the new one, never half;
  fsynced before the rename, and a symlink at ``path`` is replaced, not followed
  (:func:`irnet_jax.workdir.write_atomic`)."""
  workdir_lib.write_atomic(path, text)


def write_json_atomic(path: str, obj: Any) -> None:
  """``obj`` as indented JSON at ``path``, atomically (see :func:`_write_atomic`)."""
  _write_atomic(path, json.dumps(obj, indent=2))


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  _write_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise ValueError(f"{workdir} has no {CONFIG_FILE}; is it the --workdir of a training "
                     "run made with `python -m irnet_jax.main`?")
  record = _read_json(path, "it is the run's config: restore it from a copy, or rewrite it "
                     "from the config file the run was trained with")
  if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
    raise workdir_lib.WorkdirError(f"{path} is damaged (no 'model' section); restore it "
                                   "from a copy, or rewrite it from the run's config file.")
  return ml_collections.ConfigDict(record)


def load_model(workdir: str, step: int | None = None,
               config: ml_collections.ConfigDict | None = None
               ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """The model of a training run, restored from ``WORKDIR/checkpoints`` in eval mode.

  Args:
    workdir: the ``--workdir`` of ``python -m irnet_jax.main`` (or of
      ``python -m irnet_jax.convert``).
    step: which checkpoint; None = the newest readable one.
    config: the config to build the model from; None = ``WORKDIR/config.json``.

  Returns:
    ``(model, config)`` with ``model.eval()`` already called.
  """
  config = load_config(workdir) if config is None else config
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  try:
    model = _restore_model(ckpt, config, step)
  finally:
    ckpt.close()
  model.eval()
  return model, config


def _restore_model(ckpt: Checkpointer, config: ml_collections.ConfigDict,
                   step: int | None) -> nnx.Module:
  """The model of checkpoint ``step`` (None: the newest readable one) of ``ckpt``."""
  steps = ckpt.all_steps()
  if not steps:
    raise ValueError(f"no checkpoint in {ckpt.directory}; train first (or check --workdir).")
  if step is not None and step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {ckpt.directory}; have {steps}.")
  # config.json records the training run's convolution backend; the parameters do
  # not depend on it, and this process picks its own for its devices.
  model = config_lib.build_model(config, conv_impl="auto")
  template = nnx.state(model)
  if step is None:
    restored = ckpt.restore_latest(template)
    if restored is None:
      raise ValueError(f"no readable checkpoint in {ckpt.directory}.")
  else:
    try:
      problems = ckpt.incompatibilities(step, template)
      restored = None if problems else ckpt.restore(step, template)
    except Exception as e:  # Orbax raises many types for damaged files.
      raise workdir_lib.WorkdirError(
          f"checkpoint {step} in {ckpt.directory} cannot be read ({type(e).__name__}: "
          f"{e}); pick another of {steps}, or none for the newest readable one.") from e
    if problems:
      raise IncompatibleCheckpointError(f"checkpoint {step} in {ckpt.directory} does not fit "
                                        f"model {config.model.name!r}: " + "; ".join(problems))
  nnx.update(model, restored[0])
  return model
