"""What a run directory holds besides checkpoints: its lock and its metrics.

* ``WORKDIR/.lock`` (``.lock.<process_index>`` for processes other than 0 of a
  multi-host run): :class:`WorkdirLock`, an OS file lock held for the life of a run,
  so that two runs never write one workdir. The file records the holder (pid, host,
  start time) for the message that refuses the second run.
* ``WORKDIR/metrics.jsonl`` and ``WORKDIR/tensorboard/<split>/``: :class:`MetricsWriter`,
  one writer for both. ``metrics.jsonl`` is the record (one JSON object a line, on
  disk before :meth:`MetricsWriter.write` returns); the TensorBoard event files
  carry the same numeric scalars, one run per ``split`` ("train", "test",
  "analysis", ...), for ``tensorboard --logdir WORKDIR/tensorboard``.

Checkpoints are :mod:`irnet_jax.checkpointing`'s, ``config.json`` and ``run.json``
:mod:`irnet_jax.run_record`'s (kept apart: this module needs only the standard
library). Every whole file of the workdir is written by :func:`write_atomic` (a
temporary in the same directory, fsynced, renamed over the destination: a symlink
placed there is replaced, never written through).

The command-line tools share :func:`cli_errors` (here because this module needs only
the standard library, so that the light CLIs import nothing heavy for it): expected
failures become one ``error: ...`` line on stderr and exit status 1; ``--debug`` or
``IRNET_JAX_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".lock"

# Records without a ``split`` field go to this TensorBoard run.
_DEFAULT_SPLIT = "other"


class WorkdirError(ValueError):
  """A workdir file that is missing, damaged or of the wrong kind (e.g. a symlink
  where the run writes); the message names the file and the fix."""


# ------------------------------------------------------------------ metrics


class MetricsWriter:
  """Appends records to ``WORKDIR/metrics.jsonl`` and their scalars to TensorBoard.

  Each :meth:`write` appends one JSON line (flushed and fsynced: a kill loses nothing
  written) and, with ``tensorboard``, adds every numeric field but ``step`` as a scalar
  (tag = key) at ``global_step=record["step"]`` to ``WORKDIR/tensorboard/<split>/``.
  Strings, booleans and other non-numbers reach only the JSON line.

  Both are on disk when :meth:`write` returns: the event files are written
  synchronously (:class:`_EventFile`), so a checkpoint started after a write implies
  the record, in both. Call order on resume: :meth:`truncate_after` (the checkpoint's
  step) before the first :meth:`write`, then :meth:`close` at the end of the run.
  A writer with ``enabled=False`` (processes other than 0) writes nothing at all.
  """

  def __init__(self, workdir: str, enabled: bool, tensorboard: bool = True):
    self.path = os.path.join(workdir, METRICS_FILE)
    self.tensorboard_dir = os.path.join(workdir, TENSORBOARD_DIR)
    self.enabled = enabled
    self.tensorboard = tensorboard and enabled
    if enabled:  # Refused before the run starts, not at its first record.
      _refuse_symlink(self.path)
    if self.tensorboard:
      _tensorboardx()  # A missing tensorboardX fails now, not at the first record.
    self._tb_writers: dict[str, _EventFile] = {}  # split -> its event file, lazily.
    # TensorBoard drops, per run, the events at steps >= the step of a new writer's
    # session-start event; None = not resumed (each split starts at its first record).
    self._purge_step: int | None = None

  def truncate_after(self, step: int) -> None:
    """Drops records past ``step`` (a resumed run re-logs what followed its checkpoint):
    from ``metrics.jsonl`` now, and from what TensorBoard shows through a new event
    file per split already on disk, opened now, whose session-start event carries
    the purge step ``step + 1``."""
    if not self.enabled:
      return
    self._close_tensorboard()  # Writers opened from now on carry the purge step.
    self._purge_step = step + 1
    if self.tensorboard and os.path.isdir(self.tensorboard_dir):
      # Every split already on disk gets its purge now, even one this run never
      # writes again (else TensorBoard would keep its records past ``step``).
      for split in sorted(os.listdir(self.tensorboard_dir)):
        if os.path.isdir(os.path.join(self.tensorboard_dir, split)):
          self._tb_writer(split, self._purge_step)
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = f.readlines()
    kept = []
    for line in lines:
      try:
        if json.loads(line).get("step", 0) <= step:
          kept.append(line if line.endswith("\n") else line + "\n")
      except json.JSONDecodeError:  # A line cut by a kill.
        continue
    write_atomic(self.path, "".join(kept))

  def write(self, record: dict[str, Any]) -> None:
    """Appends ``record`` (JSON-able values, numpy/JAX scalars included; ``step`` an
    int, ``split`` a name) to ``metrics.jsonl`` and its scalars to TensorBoard."""
    if not self.enabled:
      return
    record = {k: _jsonable(v) for k, v in record.items()}
    scalars = {k: float(v) for k, v in record.items() if k != "step" and _is_number(v)}
    split = str(record.get("split", _DEFAULT_SPLIT))
    if self.tensorboard and scalars:  # Checked before anything is written.
      if "step" not in record:
        raise ValueError(f"metrics record {record} has no 'step'; TensorBoard needs one: "
                         "add step=<training step> to the record.")
      if not split or split in (".", "..") or os.sep in split:
        raise ValueError(f"metrics split {split!r} is not a plain directory name; "
                         "use a name like 'train' or 'test'.")
    line = (json.dumps(record) + "\n").encode()
    # O_NOFOLLOW: a symlink put in place of metrics.jsonl after the check in __init__
    # is refused too (ELOOP) instead of being appended through.
    try:
      fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW
                   | os.O_CLOEXEC, 0o666)
    except OSError as e:
      if e.errno == errno.ELOOP:
        _refuse_symlink(self.path)
      raise
    try:
      view = memoryview(line)
      while view:  # os.write may write less than asked (a signal, a nearly full disk).
        view = view[os.write(fd, view):]
      os.fsync(fd)
    finally:
      os.close(fd)
    if self.tensorboard and scalars:  # An "event" of strings opens no empty run directory.
      step = int(record["step"])
      self._tb_writer(split, step).write(scalars, step)

  def close(self) -> None:
    """Closes the event files; a later :meth:`write` opens new ones."""
    self._close_tensorboard()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _tb_writer(self, split: str, first_step: int) -> _EventFile:
    writer = self._tb_writers.get(split)
    if writer is None:
      # Every event file starts with a session-start event: TensorBoard ignores a run's
      # first one and purges on any later one, so a resume only purges if the first
      # session of the run had one too.
      purge = self._purge_step if self._purge_step is not None else first_step
      writer = _EventFile(os.path.join(self.tensorboard_dir, split), purge)
      self._tb_writers[split] = writer
    return writer

  def _close_tensorboard(self) -> None:
    for writer in self._tb_writers.values():
      writer.close()
    self._tb_writers.clear()


def _tensorboardx():
  """tensorboardX's record writer, summaries and protos. Imported here: a run with
  tensorboard=False (or a process other than 0) never needs them."""
  # pylint: disable=import-outside-toplevel
  try:
    from tensorboardX import event_file_writer, summary
    from tensorboardX.proto import event_pb2
  except ImportError as e:
    raise ImportError("tensorboardX is not installed: pip install tensorboardX, or set "
                      "--config.tensorboard=False") from e
  return event_file_writer, summary, event_pb2


class _EventFile:
  """One TensorBoard event file of one run (split), written synchronously.

  Why not tensorboardX's ``SummaryWriter``: its events go through a writer thread whose
  ``flush`` does not wait for the events still queued, so "a checkpoint implies its
  step's records" would not hold for the event files. This writes with tensorboardX's
  own record writer (``EventsWriter``) and summary protos, as ``SummaryWriter`` does,
  without the thread: a record is in the file when :meth:`write` returns.
  """

  def __init__(self, logdir: str, purge_step: int):
    event_file_writer, self._summary, self._pb = _tensorboardx()
    os.makedirs(logdir, exist_ok=True)
    # TensorBoard reads a run's event files in name order and they are named by the
    # second: the nanosecond suffix keeps two files of one second in order.
    self._writer = event_file_writer.EventsWriter(
        os.path.join(logdir, "events"), f".{time.time_ns():020d}")
    # What SummaryWriter(purge_step=...) writes first: TensorBoard drops this run's
    # events at steps >= purge_step that came before this session.
    self._writer.write_event(self._pb.Event(step=purge_step, file_version="brain.Event:2"))
    self._writer.write_event(self._pb.Event(
        step=purge_step, wall_time=time.time(),
        session_log=self._pb.SessionLog(status=self._pb.SessionLog.START)))
    self._writer.flush()

  def write(self, scalars: dict[str, float], step: int) -> None:
    """One event per scalar (tag = key) at ``step``; in the file on return."""
    for tag, value in scalars.items():
      self._writer.write_event(self._pb.Event(
          wall_time=time.time(), step=step, summary=self._summary.scalar(tag, value)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


def _jsonable(v: Any) -> Any:
  return v.item() if hasattr(v, "item") else v


def _is_number(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _refuse_symlink(path: str) -> None:
  """Raises :class:`WorkdirError` if ``path`` is a symbolic link (appends would follow
  it and write outside the workdir)."""
  if os.path.islink(path):
    raise WorkdirError(
        f"{path} is a symbolic link (to {os.readlink(path)!r}); the run appends its metrics "
        f"only to a regular file in the workdir: remove the link (rm {path}) and rerun.")


def _default_mode() -> int:
  """0o666 less the process umask: the mode ``open(path, "w")`` would have given."""
  # os.umask can only be read by setting it; done once, at import (single-threaded).
  mask = os.umask(0o022)
  os.umask(mask)
  return 0o666 & ~mask


_FILE_MODE = _default_mode()


def flatten(nested: Any, prefix: str = "") -> dict[str, Any]:
  """``{"optimizer.learning_rate": 0.1, ...}``: the leaves of nested dicts (or
  ConfigDicts) under dotted keys, in the nested order. (Here, beside the workdir's
  JSON files it reads, because this module needs only the standard library.)"""
  out = {}
  for key in nested.keys():
    value = nested[key]
    if isinstance(value, dict) or hasattr(value, "to_dict"):  # dict or ConfigDict
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def write_atomic(path: str, data: str | bytes) -> None:
  """Writes ``data`` to ``path`` so that readers see the old file or the new one.

  A new temporary in the same directory (``O_EXCL``: never an existing file or a
  symlink), written and fsynced, then ``os.replace``d over ``path`` and the directory
  fsynced: a kill or a power cut leaves the old file or the new one, never half of
  it. A symlink at ``path`` is replaced by the file, not written through.
  """
  directory, name = os.path.split(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fchmod(f.fileno(), _FILE_MODE)  # mkstemp's 0600 would hide it from other users.
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_directory(directory)


def write_json_atomic(path: str, obj: Any) -> None:
  """``obj`` as indented JSON at ``path``, atomically (:func:`write_atomic`)."""
  write_atomic(path, json.dumps(obj, indent=2))


def _fsync_directory(directory: str) -> None:
  """Makes a rename in ``directory`` durable (best effort: not every filesystem can)."""
  try:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


# ------------------------------------------------------------------ the lock


class WorkdirBusyError(RuntimeError):
  """Another live process holds the workdir's lock; ``holder`` is what it recorded
  (``pid``, ``host``, ``started``; empty if it had not written it yet)."""

  def __init__(self, message: str, holder: dict[str, Any]):
    super().__init__(message)
    self.holder = holder


class WorkdirLock:
  """An exclusive ``fcntl.flock`` on ``WORKDIR/.lock`` (``.lock.<process_index>`` for
  process_index > 0: one lock per process of a multi-host run), held from
  :meth:`acquire` to :meth:`release` (or the ``with`` block) and released by the OS
  when the process ends, however it ends: a lock file left behind is simply taken.

  After acquiring, the file records ``{"pid", "host", "started", "process_index"}``
  (JSON) so that a refused run can name the holder. Nothing else is written to the
  workdir (which is created if missing). Processes forked while the lock is held
  (``fork`` without ``exec``) share it and keep it after the holder exits.
  """

  def __init__(self, workdir: str, process_index: int = 0):
    self.workdir = workdir
    self.process_index = process_index
    name = LOCK_FILE if process_index == 0 else f"{LOCK_FILE}.{process_index}"
    self.path = os.path.join(workdir, name)
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def acquire(self) -> WorkdirLock:
    """Takes the lock now or raises :class:`WorkdirBusyError` (never waits)."""
    if self._fd is not None:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    # O_CLOEXEC: a program this run starts (subprocess) must not inherit the lock.
    # O_NOFOLLOW: the holder record is written into the file; a symlink there would
    # carry that write outside the workdir.
    try:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as e:
      if e.errno == errno.ELOOP:
        raise WorkdirError(f"{self.path} is a symbolic link; the workdir lock must be a "
                           f"regular file: remove the link (rm {self.path}) and rerun.") from e
      raise
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise
      holder = _read_holder(self.path)
      raise WorkdirBusyError(self._busy_message(holder), holder) from None
    previous = _read_holder(self.path)
    if previous and not previous.get("released") and _is_dead_here(previous):
      # Only a holder that ended without releasing (killed, crashed): a run that ended
      # cleanly marked its record released, and its rerun says nothing.
      log.info("%s: taking over the lock left by pid %s on %s, which ended without "
               "releasing it (killed or crashed).", self.path, previous.get("pid"),
               previous.get("host"))
    me = dict(pid=os.getpid(), host=socket.gethostname(), process_index=self.process_index,
              started=datetime.datetime.now(datetime.timezone.utc).isoformat(
                  timespec="seconds"))
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    """Marks the record released, then unlocks; the file (and its record of the last
    holder) stays."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    try:
      holder = _read_holder(self.path) or {}
      holder["released"] = datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds")
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    except OSError:  # A full disk: the lock is released all the same.
      pass
    finally:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)

  def __enter__(self) -> WorkdirLock:
    return self.acquire()

  def __exit__(self, *exc_info) -> None:
    self.release()

  def _busy_message(self, holder: dict[str, Any]) -> str:
    where = (f"pid {holder.get('pid')} on {holder.get('host')}"
             f" (since {holder.get('started')})" if holder
             else "another process (it has not recorded its pid yet)")
    if holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
      where += ", this very process (a second WorkdirLock on the same workdir)"
    elif holder and _is_dead_here(holder):
      where += (", which has exited: a process it forked still holds the lock, stop "
                "that one")
    return (f"workdir {self.workdir} is in use: {self.path} is locked by {where}; wait "
            "for that run to finish, stop it, or use another --workdir.")


def _read_holder(path: str) -> dict[str, Any]:
  """The holder a lock file records; empty if none (new, or written half)."""
  try:
    with open(path) as f:
      holder = json.loads(f.read() or "{}")
  except (OSError, json.JSONDecodeError):
    return {}
  return holder if isinstance(holder, dict) else {}


def _is_dead_here(holder: dict[str, Any]) -> bool:
  """Whether ``holder`` was a process of this host that no longer runs (False when
  it cannot be known: another host, or no pid recorded)."""
  pid = holder.get("pid")
  if holder.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except PermissionError:  # Alive, another user's.
    return False
  return False



# ------------------------------------------------------------------ command-line errors

DEBUG_ENV = "IRNET_JAX_DEBUG"  # "1": every CLI shows tracebacks (as --debug does).
DEBUG_FLAG = "--debug"

# What a user can cause and fix (bad config, workdir, files, disk), as opposed to bugs:
# the CLIs print these as one line. ValueError covers ConfigError, RunMismatchError,
# IncompatibleCheckpointError, WorkdirError, the packed-format errors and JSON errors.
EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, ImportError, WorkdirBusyError)

# pyproject.toml's optional extras, by the top-level modules they bring (the ones this
# package imports; tests/test_packaging.py runs each tool without them).
EXTRAS = {
    "train": ("grain", "PIL", "tqdm", "tensorboardX", "sklearn"),
    "tfds": ("tensorflow_datasets", "array_record"),
    "torch": ("torch",),
    "plots": ("matplotlib",),
}
_EXTRA_OF = {module: extra for extra, modules in EXTRAS.items() for module in modules}


class MissingExtraError(ImportError):
  """An optional dependency is not installed; the message names the extra to install."""


def require_extra(extra: str, what: str) -> None:
  """Raises :class:`MissingExtraError` naming ``pip install "irnet_jax[extra]"`` if a
  module of ``extra`` is not installed (found without importing it). ``what``: what
  needs it, for the message (e.g. "python -m irnet_jax.main")."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  missing = [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]
  if missing:
    raise MissingExtraError(f"{what} needs the [{extra}] extra ({', '.join(missing)} not "
                            f"installed): pip install \"irnet_jax[{extra}]\"")


def _missing_extra_line(e: ImportError) -> str | None:
  """``error: ...`` naming the extra of a module that failed to import, if it is one."""
  extra = _EXTRA_OF.get((e.name or "").split(".")[0])
  if extra is None or isinstance(e, MissingExtraError):
    return None
  return (f"error: {e.name} is not installed; it comes with the [{extra}] extra: "
          f"pip install \"irnet_jax[{extra}]\"")


def run_tool_needing(extra: str, what: str) -> None:
  """For a tool's ``if __name__ == "__main__":`` block, before its heavy imports: the
  one ``error:`` line and exit status 1 when ``extra`` is missing (--help included:
  the tool cannot even be imported)."""
  try:
    require_extra(extra, what)
  except MissingExtraError as e:
    sys.exit(f"error: {e}")

# Hints by errno for OSError (they carry no advice of their own).
_OS_HINTS = {
    errno.EACCES: "check the permissions (or use another --workdir/--out)",
    errno.EPERM: "check the permissions (or use another --workdir/--out)",
    errno.EROFS: "the filesystem is read-only: use a writable --workdir/--out",
    errno.ENOSPC: "the disk is full: free space and rerun the same command (what was "
                  "written before, checkpoints included, is kept)",
    errno.EDQUOT: "the disk quota is exhausted: free space and rerun the same command",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a file is in the way of a directory on that path: use another path",
    errno.EEXIST: "a file is in the way of a directory on that path: use another path",
    errno.EISDIR: "a directory is in the way of a file on that path: use another path",
}


def debug_requested(flag: bool = False) -> bool:
  """Whether tracebacks were asked for: ``flag`` (``--debug``) or ``IRNET_JAX_DEBUG=1``."""
  return flag or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(e: BaseException) -> str:
  """The ``error: ...`` text of an expected failure (see :data:`EXPECTED_ERRORS`)."""
  if isinstance(e, OSError) and e.strerror:
    paths = [p for p in (e.filename, e.filename2) if p is not None]
    text = e.strerror + (f": {' -> '.join(map(str, paths))}" if paths else "")
    hint = _OS_HINTS.get(e.errno)
    return f"error: {text}" + (f"; {hint}." if hint else ".")
  if isinstance(e, ImportError):
    line = _missing_extra_line(e)
    if line is not None:
      return line
  text = str(e) or type(e).__name__
  if not _raised_by_this_package(e) and not isinstance(e, MissingExtraError):
    # Not one of this package's messages (which name the fix) but a library's: where
    # it came from may matter, so say how to see it. Tensorstore (Orbax's storage)
    # reports an OS error as "... [os_error_code='28']": its hint comes first.
    code = re.search(r"os_error_code='?(\d+)", text)
    hint = _OS_HINTS.get(int(code.group(1))) if code else None
    text = ((f"{os.strerror(int(code.group(1)))}; {hint}. " if hint else "")
            + f"{type(e).__name__}: {text} (rerun with {DEBUG_FLAG} or {DEBUG_ENV}=1 for "
            "the traceback)")
  return f"error: {text}"


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _raised_by_this_package(e: BaseException) -> bool:
  """Whether the innermost frame of ``e``'s traceback is irnet_jax code (a ``raise``
  of ours, whose message is written for users)."""
  tb = e.__traceback__
  if tb is None:
    return type(e).__module__.startswith("irnet_jax")
  while tb.tb_next is not None:
    tb = tb.tb_next
  return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PACKAGE_DIR)


@contextlib.contextmanager
def cli_errors(debug: bool = False) -> Iterator[None]:
  """Turns expected failures in the block into ``error: ...`` on stderr and exit
  status 1 (Ctrl-C: 130); with ``debug``, lets them propagate (traceback)."""
  try:
    yield
  except KeyboardInterrupt:
    if debug:
      raise
    print("interrupted", file=sys.stderr, flush=True)
    sys.exit(130)
  except EXPECTED_ERRORS as e:
    if debug:
      raise
    sys.exit(error_line(e))
