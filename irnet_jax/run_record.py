"""What a run records in its workdir: its config and its identity.

* ``WORKDIR/config.json``: the run's config (``model.num_classes`` resolved), so that
  :func:`irnet_jax.checkpointing.load_model` rebuilds the network without the config
  file (:func:`save_config`, :func:`load_config`).
* ``WORKDIR/run.json``: the run's identity (:func:`run_spec`): every config field that
  defines the run, its sha256 (:func:`run_fingerprint`, also in every checkpoint's meta)
  and the quantities derived from the data (``num_train_examples``,
  ``steps_per_epoch``, ``total_steps``), so that a restart with another config is
  refused before anything in the workdir changes (:func:`check_run`, then
  :func:`record_run`).

The lock and the metrics are :mod:`irnet_jax.workdir`'s, the checkpoints
:mod:`irnet_jax.checkpointing`'s. Files are written by
:func:`irnet_jax.workdir.write_atomic`.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import ml_collections

from irnet_jax import config as config_lib
from irnet_jax import workdir as workdir_lib

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"


class RunMismatchError(ValueError):
  """A restart whose config differs from the run recorded in its workdir."""


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


# Resumable fields whose resolved value is recorded with the derived quantities and must
# not change: "auto" may resolve differently on other devices, and the call mode
# changes the rounding (a lax.scan body is compiled differently from the step alone).
RESOLVED_FIELDS = ("steps_per_call_mode",)


def run_spec(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{'model.name': 'resnet20', ...}``: every field of ``config`` (num_classes
  resolved) except :data:`RESUMABLE_FIELDS`, with JSON values (tuples as lists)."""
  flat = workdir_lib.flatten(json.loads(config.to_json()))
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
                   if k in recorded["fields"] or k in RESOLVED_FIELDS)
  raise RunMismatchError(
      f"{workdir} holds another run: its config differs in {len(diffs)} field(s) that "
      f"define a run:\n{lines}\nNothing in {workdir} was changed. To start a new run, "
      f"use another --workdir; to resume this one, use its original values"
      + (f" ({fixes})" if fixes else "") + f" or its config ({workdir}/{CONFIG_FILE}). "
      "Fields that may change on resume: "
      f"{', '.join(f for f in RESUMABLE_FIELDS if f not in RESOLVED_FIELDS)}; "
      f"{', '.join(RESOLVED_FIELDS)} only to the value it resolved to.")


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
  workdir_lib.write_atomic(os.path.join(workdir, RUN_FILE), json.dumps(record, indent=2))
  return fingerprint


def _read_json(path: str, fix: str) -> Any:
  """``path``'s JSON; a damaged file is a :class:`~irnet_jax.workdir.WorkdirError`
  naming it and ``fix``."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise workdir_lib.WorkdirError(f"{path} is damaged (not JSON: {e}); {fix}.") from e


def save_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``config`` as ``WORKDIR/config.json`` (atomically)."""
  workdir_lib.write_atomic(os.path.join(workdir, CONFIG_FILE), config.to_json(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config ``WORKDIR/config.json`` records (``model.num_classes`` resolved); a
  missing or damaged file is a one-line error naming the fix."""
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
