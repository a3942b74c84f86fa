"""Checkpoints of a run (the only module that imports orbax), and a model restored
from any workdir.

Layout: ``WORKDIR/checkpoints/<step>/{model,opt,meta}`` written by an Orbax
``CheckpointManager`` (atomic: a step directory only counts once committed):

* ``model``: the NNX model state (params and BN statistics).
* ``opt``: the optimizer state (momentum buffers, step counter).
* ``signs``: (optional) the weight signs of the last information-retention analysis,
  so that a resumed run's first analysis has its flip ratios.
* ``meta``: JSON -- ``step``, ``seed``, ``data_position`` (the index of the next
  training batch; the input pipeline is a pure function of seed and position),
  ``num_classes``, ``steps_per_epoch``, ``run_fingerprint``
  (:func:`irnet_jax.run_record.run_fingerprint`), ``digests`` (the sha256 of every
  array of every item, :func:`array_digests`), and ``imported`` (the source file)
  for checkpoints made by ``irnet_jax.convert``.

Orbax verifies no checksum of array data (tensorstore's zarr chunks carry none), so a
flipped byte would restore silently: every restore here recomputes the digests of
what it read and compares them with ``meta["digests"]`` (a difference is a
:class:`CorruptCheckpointError`, handled like damaged files). The digests cost one
pass over the state per save and per restore: 125 ms for ResNet-18's ImageNet state
with its momentum (23.4M values, 89 MiB) on the 2-core Xeon, 2026-12-05. PRNG key arrays (the
state of ``nnx.Rngs`` streams, e.g. of ``nnx.Dropout``) are stored as their ``uint32``
key data and wrapped again on restore: Orbax stores plain arrays only.

:class:`Checkpointer` saves and restores them for a training run;
:func:`restore_model` (and :func:`load_model`, which also builds the network from
``config.json``) is how every other reader gets a model out of a workdir. The run's
``config.json`` and ``run.json`` are :mod:`irnet_jax.run_record`'s; its lock and
metrics :mod:`irnet_jax.workdir`'s.

A checkpoint that cannot be read (damaged or truncated files, or array data that
does not match its digests) is skipped with a
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
import logging
import os
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from irnet_jax import config as config_lib
from irnet_jax import run_record
from irnet_jax import workdir as workdir_lib

DAMAGED_DIR = ".damaged"  # Under checkpoints/: damaged checkpoints moved aside.
log = logging.getLogger(__name__)


class IncompatibleCheckpointError(ValueError):
  """A readable checkpoint of another run, or one that does not fit the model."""


class CorruptCheckpointError(ValueError):
  """Array data whose sha256 differs from the one recorded when it was saved."""


class Restored(NamedTuple):
  """A restored checkpoint: the states asked for (None where not asked for)."""
  model: Any
  opt: Any | None
  meta: dict
  signs: Any | None = None  # The last analysis's weight signs, where saved and asked for.


# ------------------------------------------------------------------ arrays as stored


def _is_key(x: Any) -> bool:
  return jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key)


def _stored(tree: Any) -> Any:
  """``tree`` as Orbax stores it: PRNG key arrays as their uint32 key data."""
  return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract(tree: Any) -> Any:
  """Shape/dtype/sharding skeleton of ``tree``'s stored form (:func:`_stored`), for
  restoring onto the same placement."""
  def leaf(x):
    shape = jax.eval_shape(jax.random.key_data, x) if _is_key(x) else x
    return jax.ShapeDtypeStruct(shape.shape, shape.dtype,
                                sharding=getattr(x, "sharding", None))
  return jax.tree.map(leaf, tree)


def _unstored(restored: Any, template: Any) -> Any:
  """Inverse of :func:`_stored`: key data wrapped again, with the template's PRNG
  implementation (JAX's default for an abstract template)."""
  def leaf(r, t):
    if not _is_key(t):
      return r
    impl = jax.random.key_impl(t) if isinstance(t, jax.Array) else None
    return jax.random.wrap_key_data(r, impl=impl)
  return jax.tree.map(leaf, restored, template)


def _path_name(path: tuple) -> str:
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return str(getattr(key, attr))
    return str(key)
  return ".".join(name(k) for k in path)


def host_array(x: Any) -> np.ndarray:
  """The value of an array on this host (PRNG keys as their key data). A replicated
  ``jax.Array`` of a multi-host run is read through its local copy (it is not fully
  addressable); every state this project saves is replicated."""
  if _is_key(x):
    x = jax.random.key_data(x)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    x = x.addressable_data(0)
  return np.ascontiguousarray(np.asarray(jax.device_get(x)))


def array_digests(tree: Any) -> dict[str, str]:
  """``{'layer1.0.conv1.kernel.value': sha256 hex}`` over each array's dtype, shape and
  bytes, for every array of ``tree``."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    value = host_array(leaf)
    h = hashlib.sha256(f"{value.dtype.str}{value.shape}".encode())
    h.update(value.tobytes())
    out[_path_name(path)] = h.hexdigest()
  return out


def _verify(item: str, restored: Any, recorded: dict[str, str] | None) -> None:
  """Raises :class:`CorruptCheckpointError` unless ``restored`` (stored form) holds the
  arrays that were saved. Checkpoints written before digests were recorded pass."""
  if recorded is None:
    return
  now = array_digests(restored)
  bad = sorted(k for k in now.keys() | recorded.keys() if now.get(k) != recorded.get(k))
  if bad:
    raise CorruptCheckpointError(
        f"the array data of {item!r} differs from the sha256 recorded when it was saved, "
        f"in {len(bad)} array(s), e.g. {bad[:3]}")


def _flat_shapes(tree: Any) -> dict[str, tuple]:
  """``{'layer1.0.conv1.kernel.value': shape}`` of a state or of Orbax tree metadata."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {_path_name(path): tuple(leaf.shape) for path, leaf in leaves}


def _tree_mismatch(item: str, saved: Any, template: Any) -> list[str]:
  """Human-readable differences between a checkpoint item's metadata and a template."""
  have, want = _flat_shapes(saved), _flat_shapes(_abstract(template))
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


# ------------------------------------------------------------------ the checkpointer


class Checkpointer:
  """Saves and restores ``(model_state, opt_state, meta[, signs])`` under ``directory``."""

  def __init__(self, directory: str, max_to_keep: int = 3, create: bool = True):
    """``create=False`` for readers: a workdir without checkpoints is left as it is."""
    self.directory = os.path.abspath(directory)
    # Handlers named up front so that a fresh manager can read item metadata
    # (tree structure, shapes) without restoring any array.
    handlers = dict(model=ocp.StandardCheckpointHandler(), opt=ocp.StandardCheckpointHandler(),
                    signs=ocp.StandardCheckpointHandler(), meta=ocp.JsonCheckpointHandler())
    self._manager = ocp.CheckpointManager(
        self.directory, item_handlers=handlers,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create))

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, model_state: Any, opt_state: Any, meta: dict,
           signs: Any | None = None) -> None:
    """Starts an (asynchronous) save of step ``step``; see :meth:`wait`. The digests
    of every array are computed now, from the states in memory (one device-to-host
    copy, which Orbax makes anyway)."""
    items = dict(model=_stored(model_state), opt=_stored(opt_state))
    if signs is not None:
      items["signs"] = signs
    meta = dict(meta, digests={k: array_digests(v) for k, v in items.items()})
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    saved = self._manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta),
                                                             **args))
    if not saved:  # Orbax declines a step <= its newest one, silently.
      log.warning("checkpoint %d was not saved: %s already has step %s; steps up to it are "
                  "skipped until the run passes it.", step, self.directory,
                  self._manager.latest_step())

  def restore(self, step: int, model_state: Any, opt_state: Any | None = None,
              signs: Any | None = None) -> Restored:
    """Restores step ``step`` onto the shapes/shardings of the given (template) states,
    each verified against the digests saved with it (:class:`CorruptCheckpointError`).
    ``signs``: a template of the analysis signs, restored if the step has them."""
    templates = dict(model=model_state, opt=opt_state)
    if signs is not None and self._manager.item_metadata(step).get("signs") is not None:
      templates["signs"] = signs
    templates = {k: v for k, v in templates.items() if v is not None}
    items = {k: ocp.args.StandardRestore(_abstract(v)) for k, v in templates.items()}
    restored = self._manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore(), **items))
    meta = dict(restored["meta"])
    digests = meta.pop("digests", None) or {}
    out = {}
    for item, template in templates.items():
      _verify(item, restored[item], digests.get(item))
      out[item] = _unstored(restored[item], template)
    return Restored(out["model"], out.get("opt"), meta, out.get("signs"))

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
                     fingerprint: str | None = None, repair: bool | None = None,
                     signs: Any | None = None, before: int | None = None
                     ) -> Restored | None:
    """The newest readable, verified checkpoint (None if there is no checkpoint at all).

    A damaged newest checkpoint (unreadable or truncated files, or array data that
    differs from its digests) is reported with a warning and the previous one is
    tried, so one bad write or flipped bit never ends a run. A readable checkpoint
    that does not fit the templates, or whose meta names a ``run_fingerprint`` other
    than ``fingerprint``, raises :class:`IncompatibleCheckpointError`; so does a
    directory where no checkpoint can be read (rather than starting over and rotating
    them away; nothing is moved).

    ``repair``: move the damaged checkpoints newer than the one restored to
    ``.damaged/`` (:meth:`_set_aside`), so that the run saves those steps again
    (Orbax skips a step at or below its newest one). None = when ``opt_state`` is
    given: a training run resuming, which holds the workdir lock. Readers (evaluate,
    export, ``init_from``) only fall back and leave the workdir as it is. With several
    processes, every one must call this (it synchronizes them); process 0 moves.
    ``signs``: see :meth:`restore`. ``before``: only steps up to it are considered.
    """
    repair = opt_state is not None if repair is None else repair
    steps = [s for s in self.all_steps() if before is None or s <= before]
    errors, damaged = [], []
    for step in reversed(steps):
      problems, error = self._try(step, model_state, opt_state, fingerprint)
      if problems:
        raise IncompatibleCheckpointError(
            f"checkpoint {step} in {self.directory} does not belong to this run: "
            + "; ".join(problems) + ". Nothing was changed. Use another --workdir for a "
            "new run, or the config this workdir was trained with (its config.json).")
      if error is None:
        try:
          restored = self.restore(step, model_state, opt_state, signs)
        except Exception as e:  # pylint: disable=broad-except
          error = e
        else:
          if repair:
            self._set_aside(damaged, step)
          return restored
      if not os.path.isdir(os.path.join(self.directory, str(step))):
        # Removed while it was read: a live run with keep_checkpoints rotated it away.
        log.info("checkpoint %d in %s was removed while it was read (a run is writing "
                 "this workdir); trying the previous one.", step, self.directory)
        continue
      errors.append(f"{step}: {type(error).__name__}: {error}")
      damaged.append(step)
      log.warning("checkpoint %d in %s is unreadable or corrupt (%s: %s); falling back to "
                  "the previous one.%s", step, self.directory, type(error).__name__, error,
                  "" if repair else " A training run of this workdir (the same command) "
                  "moves it aside and saves the step again.")
    if steps and errors:
      raise IncompatibleCheckpointError(
          f"no checkpoint in {self.directory} can be read ({'; '.join(errors)}). Nothing "
          "was changed; move the directory away (or use another --workdir) to start over.")
    if steps:  # Every one was rotated away while being read: read the new list.
      self._manager.reload()
      return self.restore_latest(model_state, opt_state, fingerprint, repair, signs, before)
    return None

  def _try(self, step: int, model_state: Any, opt_state: Any | None,
           fingerprint: str | None) -> tuple[list[str] | None, Exception | None]:
    """``(problems, None)`` from :meth:`incompatibilities`, or ``(None, error)`` when
    the checkpoint's metadata cannot even be read."""
    try:
      return self.incompatibilities(step, model_state, opt_state, fingerprint), None
    except Exception as e:  # pylint: disable=broad-except  # Orbax raises many types.
      return None, e

  def newest_verified(self, model_state: Any, opt_state: Any, before: int) -> int | None:
    """The newest step up to ``before`` whose arrays read back and match their digests
    (None if none does); moves and changes nothing. For messages that name a step."""
    self.wait()
    for step in reversed([s for s in self.all_steps() if s <= before]):
      problems, error = self._try(step, model_state, opt_state, None)
      if problems or error is not None:
        continue
      try:
        self.restore(step, model_state, opt_state)
      except Exception:  # pylint: disable=broad-except
        continue
      return step
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


# ------------------------------------------------------------------ a model from anywhere


def restore_model(workdir: str, template: nnx.State, step: int | None = None
                  ) -> tuple[nnx.State, dict]:
  """The model state of a checkpoint of ``workdir``, restored onto ``template``.

  The one way the tools read a model from a workdir (evaluate, export, convert,
  training's ``config.init_from``; :func:`load_model`); ``workdir`` is only read.
  Training's resume of its own run (optimizer too, its run fingerprint checked,
  damaged checkpoints moved aside) is :meth:`Checkpointer.restore_latest`.

  Args:
    workdir: the ``--workdir`` of ``python -m irnet_jax.main`` or of
      ``python -m irnet_jax.convert``.
    template: ``nnx.state`` of the model to restore into (arrays or abstract
      ``jax.ShapeDtypeStruct``): the shapes, dtypes and shardings of the result.
    step: which checkpoint; None = the newest readable one (newer damaged ones are
      skipped with a warning).

  Returns:
    ``(model_state, meta)``; ``meta`` is the checkpoint's (``step``, ``seed``,
    ``imported``, ...; see the module docstring).

  Raises:
    ValueError: no checkpoint, or none of ``step``.
    IncompatibleCheckpointError: the checkpoint does not fit ``template``.
    irnet_jax.workdir.WorkdirError: checkpoint ``step`` cannot be read.
  """
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ValueError(f"no checkpoint in {ckpt.directory}; is {workdir} the --workdir of "
                       "a training run or of `python -m irnet_jax.convert`? Train or "
                       "convert first.")
    if step is None:
      model_state, _, meta, _ = ckpt.restore_latest(template)
    else:
      model_state, _, meta, _ = _restore_step(ckpt, template, step, steps)
  finally:
    ckpt.close()
  return model_state, meta


def _restore_step(ckpt: Checkpointer, template: nnx.State, step: int,
                  steps: list[int]) -> Restored:
  """Checkpoint ``step`` of ``ckpt`` (one of ``steps``), checked against ``template``."""
  if step not in steps:
    raise ValueError(f"no checkpoint for step {step} in {ckpt.directory}; have {steps}.")
  try:
    problems = ckpt.incompatibilities(step, template)
    restored = None if problems else ckpt.restore(step, template)
  except Exception as e:  # Orbax raises many types for damaged files.
    raise workdir_lib.WorkdirError(
        f"checkpoint {step} in {ckpt.directory} cannot be read ({type(e).__name__}: "
        f"{e}); pick another of {steps}, or none for the newest readable one.") from e
  if problems:
    raise IncompatibleCheckpointError(f"checkpoint {step} in {ckpt.directory} does not "
                                      "fit the model: " + "; ".join(problems))
  return restored


def load_model(workdir: str, step: int | None = None,
               config: ml_collections.ConfigDict | None = None
               ) -> tuple[nnx.Module, ml_collections.ConfigDict]:
  """The model of a run, built from its config and restored by :func:`restore_model`.

  Args:
    workdir: as :func:`restore_model`.
    step: which checkpoint; None = the newest readable one.
    config: the config to build the model from; None = ``WORKDIR/config.json``
      (:func:`irnet_jax.run_record.load_config`).

  Returns:
    ``(model, config)`` with ``model.eval()`` already called. The convolution backend
    is this host's (``conv_impl="auto"``), not the one the run was trained with: the
    parameters do not depend on it.
  """
  config = run_record.load_config(workdir) if config is None else config
  model = config_lib.build_model(config, conv_impl="auto")
  model_state, _ = restore_model(workdir, nnx.state(model), step)
  nnx.update(model, model_state)
  model.eval()
  return model, config
