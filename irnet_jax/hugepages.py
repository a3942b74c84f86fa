"""Transparent huge pages for XLA:CPU's per-step buffers (Linux with glibc).

XLA:CPU allocates the temporary buffers of a compiled step (about 200 MB for a
ResNet-20 training step at batch 128) afresh at every execution; glibc serves a block
that large with a new ``mmap``, so every step first touches ~50,000 new 4 KiB pages,
each a page fault that the kernel zeroes (measured: ~80 ms of CPU per step on the
2-core development machine, ~15% of the step's time). glibc's tunable
``glibc.malloc.hugetlb=1`` (glibc >= 2.35) asks for transparent huge pages on such
blocks: 2 MiB pages, 512x fewer faults. Tunables are read when a process starts, so
the launcher re-executes itself once with the tunable set; PyTorch or any other
program can be given the same environment variable.

Off with ``IRNET_JAX_HUGEPAGES=0``, when ``GLIBC_TUNABLES`` already names
``glibc.malloc.hugetlb``, or where it cannot help (not Linux/glibc, THP disabled).
"""
from __future__ import annotations

import os
import pathlib
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_THP = pathlib.Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _glibc_at_least(major: int, minor: int) -> bool:
  lib, version = platform.libc_ver()
  if lib != "glibc" or not version:
    return False
  parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
  return parts >= (major, minor)


def wanted(environ: dict[str, str] | None = None) -> bool:
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


def reexec(args: list[str]) -> None:
  """Replaces this process by ``python *args`` with the tunable set, if :func:`wanted`.

  Call it first thing in a ``__main__`` block, before anything worth keeping has
  happened (it does not return when it re-executes).
  """
  if not wanted():
    return
  tunables = os.environ.get("GLIBC_TUNABLES")
  env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}" if tunables else TUNABLE)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *args], env)
