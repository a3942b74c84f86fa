"""Preemption: SIGTERM (what TPU VMs, spot instances and SLURM send before they take a
machine back) or SIGINT stops a run cleanly between two device calls.

The loop asks :meth:`Preemption.requested` after every call; when it says yes, the
loop checkpoints the reached step, logs an ``event`` record and raises
:class:`Preempted`; the launcher exits with :data:`EXIT_CODE` and the same command
resumes bit-exactly.

* One process: Python signal handlers set a flag (restored on exit).
* Several processes (``jax.distributed``): JAX's preemption service already listens
  for SIGTERM on every process and, once any process got it, agrees with the others on
  the call at which all stop: ``multihost_utils.reached_preemption_sync_point``, asked
  with the same call counter on every process. No handler of ours is installed for
  SIGTERM then (it would replace JAX's); SIGINT keeps Python's default there, because a
  flag on one process alone cannot stop the others at the same step.
"""
from __future__ import annotations

import logging
import signal
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

# EX_TEMPFAIL from sysexits.h: "try again later"; SLURM's --requeue, systemd and
# shell loops can tell it apart from a crash (1) and from success (0).
EXIT_CODE = 75


class Preempted(Exception):
  """The run stopped on a preemption signal after checkpointing step ``step``."""

  def __init__(self, step: int, directory: str):
    super().__init__(f"stopped by a preemption signal after step {step}; its checkpoint "
                     f"is in {directory}: rerun the same command to resume.")
    self.step = step


class Preemption:
  """Context manager: installs the handlers, answers :meth:`requested`, restores them."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}

  def _handler(self, signum, frame) -> None:
    del frame
    if self.signal_name is None:
      log.warning("%s received: finishing the current call, then checkpointing",
                  signal.Signals(signum).name)
    self.signal_name = signal.Signals(signum).name

  def __enter__(self) -> "Preemption":
    if threading.current_thread() is not threading.main_thread():
      return self  # Signals reach the main thread only; nothing to install.
    signals = [signal.SIGTERM, signal.SIGINT] if jax.process_count() == 1 else []
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handler)
    return self

  def __exit__(self, *exc) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
    self._previous.clear()

  def requested(self, call_index: int) -> bool:
    """Whether to stop after the call just dispatched (``call_index`` counts the calls
    of this launch, the same on every process)."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(call_index)
    return self.signal_name is not None
