"""Compiles, checks and loads the native CPU kernels (``csrc/binary_conv.cc``).

:func:`load` returns the loaded library, or None with one warning saying why, and
then the caller uses XLA's convolutions. Nothing here can crash the process:

* **CPU check first.** The kernels need x86-64 with AVX-512 F, DQ, BW, VL and
  VPOPCNTDQ (Intel Ice Lake and later, AMD Zen 4 and later). The flags are read from
  ``/proc/cpuinfo`` before anything is compiled or loaded, so a CPU without them
  never executes an AVX-512 instruction (no SIGILL).
* **A cache keyed by everything that shapes the binary.** The library is built with
  ``$CXX`` (default ``c++``) ``-O3 -march=native`` into
  ``$IRNET_JAX_CACHE`` (default ``~/.cache/irnet_jax``), in a directory named by a hash
  of: the source, the compiler (resolved path and ``--version``), the flags, the
  jaxlib version (FFI headers) and this CPU's feature flags. ``build.json`` next to the
  library repeats those inputs; a library whose record differs from this process's
  (another CPU on a shared home, an edited or copied cache) is rebuilt, never loaded.
* **A lock and a timeout.** ``fcntl.flock`` on a lock file serializes concurrent
  builds (several processes on one machine); the compiler runs under a timeout, and
  so does the wait for the lock.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import time

import jax
import jaxlib

SOURCE = pathlib.Path(__file__).parent / "csrc" / "binary_conv.cc"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
REQUIRED_CPU_FLAGS = ("avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512_vpopcntdq")
COMPILE_TIMEOUT_S = 180.0  # a few seconds on an idle machine

log = logging.getLogger(__name__)


class Unavailable(Exception):
  """The kernels cannot be used here; the message says why."""


def cache_dir() -> pathlib.Path:
  """``$IRNET_JAX_CACHE``, or ``~/.cache/irnet_jax``."""
  root = os.environ.get("IRNET_JAX_CACHE") or os.path.join(
      os.path.expanduser("~"), ".cache", "irnet_jax")
  return pathlib.Path(root)


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
  """The CPU feature flags the kernel reports (Linux), or an empty set."""
  try:
    text = pathlib.Path(cpuinfo).read_text()
  except OSError:
    return frozenset()
  for line in text.splitlines():
    if line.startswith("flags"):
      return frozenset(line.partition(":")[2].split())
  return frozenset()


def check_cpu(flags: frozenset[str]) -> None:
  """Raises :class:`Unavailable` unless ``flags`` has every feature the kernels use."""
  if platform.machine().lower() not in ("x86_64", "amd64"):
    raise Unavailable(f"the CPU is {platform.machine()}, not x86-64")
  if not flags:
    raise Unavailable("cannot read the CPU's features from /proc/cpuinfo")
  missing = [f for f in REQUIRED_CPU_FLAGS if f not in flags]
  if missing:
    raise Unavailable(f"the CPU lacks {', '.join(missing)}")


def compiler() -> tuple[str, str]:
  """(resolved path, first line of ``--version``) of ``$CXX`` (default ``c++``)."""
  name = os.environ.get("CXX", "c++")
  path = shutil.which(name)
  if path is None:
    raise Unavailable(f"no C++ compiler {name!r} on PATH (set CXX=/path/to/g++)")
  path = os.path.realpath(path)
  try:
    out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise Unavailable(f"{path} --version failed: {e}") from e
  lines = (out.stdout or out.stderr).strip().splitlines()
  if out.returncode != 0:
    raise Unavailable(f"{path} --version exited with {out.returncode}")
  return path, lines[0] if lines else ""


def build_record(cxx: tuple[str, str], flags: frozenset[str]) -> dict:
  """Everything the library's bytes depend on; its hash names the cache entry."""
  return dict(source_sha256=hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
              compiler=cxx[0], compiler_version=cxx[1], flags=list(FLAGS),
              jaxlib=jaxlib.__version__, cpu_flags=sorted(flags))


def entry_dir(record: dict, root: pathlib.Path) -> pathlib.Path:
  key = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
  return root / f"binary_conv_{key}"


def _matches(entry: pathlib.Path, record: dict) -> bool:
  try:
    return (entry / "lib.so").is_file() and json.loads(
        (entry / "build.json").read_text()) == record
  except (OSError, ValueError):
    return False


@contextlib.contextmanager
def _locked(path: pathlib.Path, timeout: float):
  import fcntl  # POSIX only; the kernels are Linux x86-64 only anyway.
  with open(path, "a+") as f:
    deadline = time.monotonic() + timeout
    while True:
      try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
      except BlockingIOError:
        if time.monotonic() > deadline:
          raise Unavailable(f"waited {timeout:.0f} s for {path} (another process "
                            "compiling the kernels?)") from None
        time.sleep(0.1)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _atomic_write(target: pathlib.Path, write) -> None:
  # Write a temporary name and rename: no process ever sees half a file.
  with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
    tmp_path = pathlib.Path(tmp.name)
  try:
    write(tmp_path)
    os.replace(tmp_path, target)
  finally:
    tmp_path.unlink(missing_ok=True)


def library(root: pathlib.Path | None = None, flags: frozenset[str] | None = None,
            timeout: float = COMPILE_TIMEOUT_S) -> pathlib.Path:
  """Path of a library built for this CPU and compiler, compiling it if needed.

  ``flags`` (default: this CPU's) are checked first; raises :class:`Unavailable`.
  """
  flags = cpu_flags() if flags is None else flags
  check_cpu(flags)
  record = build_record(compiler(), flags)
  entry = entry_dir(record, cache_dir() if root is None else root)
  if _matches(entry, record):
    return entry / "lib.so"
  entry.mkdir(parents=True, exist_ok=True)
  with _locked(entry / "lock", timeout):
    if _matches(entry, record):  # built by another process meanwhile
      return entry / "lib.so"

    def compile_to(out: pathlib.Path) -> None:
      cmd = [record["compiler"], *FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o",
             str(out)]
      try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
      except subprocess.TimeoutExpired:
        raise Unavailable(f"compiling {SOURCE.name} took over {timeout:.0f} s") from None
      except OSError as e:
        raise Unavailable(f"cannot run {record['compiler']}: {e}") from e
      if res.returncode != 0:
        detail = (res.stderr or res.stdout).strip().splitlines()
        raise Unavailable(f"{record['compiler']} failed ({res.returncode}): "
                          f"{detail[-1] if detail else 'no output'}")

    _atomic_write(entry / "lib.so", compile_to)
    _atomic_write(entry / "build.json",
                  lambda p: p.write_text(json.dumps(record, sort_keys=True, indent=1)))
  return entry / "lib.so"


@functools.cache
def load() -> ctypes.CDLL | None:
  """This process's kernels library, or None (with one warning) if it cannot be used."""
  try:
    lib = ctypes.cdll.LoadLibrary(str(library()))
    if not lib.irnet_kernels_available():
      raise Unavailable("the compiler did not enable AVX-512 VPOPCNTDQ (-march=native)")
  except (Unavailable, OSError) as e:
    log.warning("irnet_jax: CPU binary-conv kernels unavailable, using XLA's convolutions "
                "(%s)", e)
    return None
  return lib
