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
* **A library checked before it is loaded.** ``lib.json`` records the size and
  sha256 of ``lib.so`` as built; a library that no longer matches (cut short by a
  full disk or a crash, edited) is never handed to ``dlopen`` (a truncated ELF can
  crash the process with SIGBUS when its pages are touched): it is rebuilt, or, if
  that fails, :func:`load` warns and the caller uses XLA's convolutions.
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


def _built_for(entry: pathlib.Path, record: dict) -> bool:
  """Whether the entry's ``build.json`` says it was built from ``record``."""
  try:
    return json.loads((entry / "build.json").read_text()) == record
  except (OSError, ValueError):
    return False


def file_digest(path: pathlib.Path) -> dict:
  """``{"size": bytes, "sha256": hex}`` of a file (what ``lib.json`` records)."""
  digest = hashlib.sha256()
  size = 0
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
      size += len(chunk)
  return dict(size=size, sha256=digest.hexdigest())


def check_library(entry: pathlib.Path) -> str | None:
  """None if ``entry/lib.so`` is the library its build recorded in ``lib.json``
  (same size and sha256), else what is wrong, in words. Never loads it."""
  lib = entry / "lib.so"
  try:
    recorded = json.loads((entry / "lib.json").read_text())
    want_size, want_sha = int(recorded["size"]), str(recorded["sha256"])
  except (OSError, ValueError, KeyError, TypeError):
    return f"{lib} has no readable record of its size and sha256 ({entry / 'lib.json'})"
  try:
    got = file_digest(lib)
  except OSError as e:
    return f"cannot read {lib} ({e.strerror or e})"
  if got["size"] != want_size:
    return (f"{lib} has {got['size']} bytes but was built with {want_size} (cut short "
            f"by a full disk or a crash?)")
  if got["sha256"] != want_sha:
    return (f"{lib} differs from the library that was built (sha256 "
            f"{got['sha256'][:12]}..., built {want_sha[:12]}...)")
  return None


def _matches(entry: pathlib.Path, record: dict) -> bool:
  return _built_for(entry, record) and check_library(entry) is None


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
  # Write a temporary name and rename: no process ever sees half a file. The
  # fsync makes the data durable before the name: after a crash the name holds
  # the whole file or the old one, not an empty or partial one.
  with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
    tmp_path = pathlib.Path(tmp.name)
  try:
    write(tmp_path)
    with open(tmp_path, "rb") as f:
      os.fsync(f.fileno())
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
    # Built for these inputs but not what was built: damaged, never loaded. (An
    # entry of an older version, without lib.json, is rebuilt without a word.)
    damage = (check_library(entry) if _built_for(entry, record)
              and (entry / "lib.json").exists() else None)
    try:
      _build(entry, record, timeout)
    except Unavailable as e:
      if damage is None:
        raise
      raise Unavailable(f"{damage}, and rebuilding it failed: {e}") from e
    if damage is not None:
      log.warning("irnet_jax: rebuilt the CPU kernels: %s", damage)
  return entry / "lib.so"


def _build(entry: pathlib.Path, record: dict, timeout: float) -> None:
  """Compiles ``entry/lib.so``, then records its size and sha256 (``lib.json``)
  and last the inputs (``build.json``): an entry whose build stopped half-way
  never matches. The caller holds the entry's lock."""
  digest = {}

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
    digest.update(file_digest(out))  # The bytes the compiler wrote, before the rename.

  _atomic_write(entry / "lib.so", compile_to)
  _atomic_write(entry / "lib.json", lambda p: p.write_text(json.dumps(digest)))
  _atomic_write(entry / "build.json",
                lambda p: p.write_text(json.dumps(record, sort_keys=True, indent=1)))


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
