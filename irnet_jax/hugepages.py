"""Transparent huge pages for XLA:CPU's per-step buffers (Linux with glibc).

XLA:CPU allocates the temporary buffers of a compiled step (about 200 MB for a
ResNet-20 training step at batch 128) afresh at every execution; glibc serves a block
that large with a new ``mmap``, so every step first touches ~50,000 new 4 KiB pages,
each a page fault that the kernel zeroes (measured: ~80 ms of CPU per step on the
2-core development machine, ~15% of the step's time). glibc's tunable
``glibc.malloc.hugetlb=1`` (glibc >= 2.35) asks for transparent huge pages on such
blocks: 2 MiB pages, 512x fewer faults. glibc reads its tunables once, when the
process starts (there is no in-process switch: ``mallopt`` has no equivalent), so the
launcher re-executes itself once with ``GLIBC_TUNABLES`` set; PyTorch or any other
program can be given the same environment variable.

The re-exec runs the exact command line the process was started with
(``sys.orig_argv``: interpreter flags such as ``-X``, ``-W``, ``-u``, ``-O`` are kept).
It is skipped -- the run goes on without huge pages -- when re-running that command
line would not restart the same program in the same way: under a debugger, a trace
or profiling function, coverage or IPython, or when the caller is not the program
``python`` was asked to run (``-c``, ``runpy`` from elsewhere, ``%run``).

Off with ``IRNET_JAX_HUGEPAGES=0``, when ``GLIBC_TUNABLES`` already names
``glibc.malloc.hugetlb``, or where it cannot help (not Linux/glibc, THP disabled).
"""
from __future__ import annotations

import builtins
import os
import pathlib
import platform
import sys
import types
from typing import Mapping, Sequence

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")
# Interpreter options that take a separate argument (``python -X dev``).
_OPTIONS_WITH_ARG = ("-X", "-W", "--check-hash-based-pycs")


def _glibc_at_least(major: int, minor: int) -> bool:
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return False
  parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
  return parts >= (major, minor)


def wanted(environ: Mapping[str, str] | None = None) -> bool:
  """Whether re-executing with :data:`TUNABLE` would change anything here."""
  environ = os.environ if environ is None else environ
  if environ.get("IRNET_JAX_HUGEPAGES", "1") == "0":
    return False
  if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return False  # already set (by us, before a re-exec, or by the user)
  if not sys.platform.startswith("linux") or not _glibc_at_least(2, 35):
    return False
  try:
    return "[never]" not in _THP.read_text()
  except OSError:
    return False


def program(orig_argv: Sequence[str]) -> tuple[str, str] | None:
  """What ``python`` was asked to run: ``("module", name)`` for ``-m name``,
  ``("script", path)``, or None (``-c``, stdin, no program)."""
  args = iter(orig_argv[1:])
  for arg in args:
    if arg == "-m":
      return ("module", next(args, ""))
    if arg.startswith("-m"):
      return ("module", arg[2:])
    if arg == "-" or arg.startswith("-c"):
      return None
    if arg in _OPTIONS_WITH_ARG:
      next(args, None)
    elif arg == "--":
      path = next(args, None)
      return ("script", path) if path and path != "-" else None
    elif not arg.startswith("-"):
      return ("script", arg)
  return None


def _runs_as_main(prog: tuple[str, str] | None, main: types.ModuleType | None) -> bool:
  """Whether module ``__main__`` is the program ``prog`` names."""
  if prog is None or main is None:
    return False
  kind, target = prog
  if kind == "module":
    spec = getattr(main, "__spec__", None)
    return spec is not None and spec.name in (target, f"{target}.__main__")
  path = getattr(main, "__file__", None)
  return path is not None and os.path.realpath(path) == os.path.realpath(target)


def _tool_active() -> bool:
  """A ``sys.monitoring`` tool (debugger, coverage, profiler; Python >= 3.12) is set."""
  monitoring = getattr(sys, "monitoring", None)
  if monitoring is None:
    return False
  return any(monitoring.get_tool(i) is not None for i in range(6))


def why_not(caller: str, environ: Mapping[str, str] | None = None) -> str | None:
  """Why re-executing now would not restart the same program unchanged; None if it
  would. ``caller``: ``__name__`` of the module asking."""
  environ = os.environ if environ is None else environ
  if caller != "__main__":
    return "not called from the __main__ module"
  if sys.gettrace() is not None or sys.getprofile() is not None or _tool_active():
    return "a debugger, trace or profiling function is active"
  if "pdb" in sys.modules:
    return "running under pdb"
  if "coverage" in sys.modules or "COVERAGE_RUN" in environ:
    return "running under coverage"
  ipython = sys.modules.get("IPython")  # imported by libraries too: ask for a shell
  if hasattr(builtins, "__IPYTHON__") or (
      ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None):
    return "running inside IPython"
  orig_argv = getattr(sys, "orig_argv", None)
  if not orig_argv or not _runs_as_main(program(orig_argv), sys.modules.get("__main__")):
    return "__main__ is not the program named on the command line (python -m or a script)"
  return None


def reexec(caller: str) -> None:
  """Replaces this process by its own command line (``sys.orig_argv``, interpreter
  flags included) with the tunable set, if :func:`wanted` and :func:`why_not` allow.

  Call it first thing in the ``__main__`` block of a program started with
  ``python [flags] -m module`` or ``python [flags] script.py``, passing
  ``__name__``, before anything worth keeping has happened (it does not return when
  it re-executes).
  """
  if not wanted() or why_not(caller) is not None:
    return
  tunables = os.environ.get("GLIBC_TUNABLES")
  env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
