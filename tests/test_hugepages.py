"""The launcher's huge-page re-exec (irnet_jax.hugepages)."""
import os
import subprocess
import sys

import pytest

from irnet_jax import hugepages

# A program that reports its environment and flags, asks to re-execute, and reports
# again: a re-executed run prints "before" twice (the second time with the tunable).
_PROBE = """\
import builtins, os, sys, types
if "trace" in sys.argv:
  sys.settrace(lambda *a: None)
if "coverage" in sys.argv:
  sys.modules["coverage"] = types.ModuleType("coverage")
if "ipython" in sys.argv:
  builtins.__IPYTHON__ = True
from irnet_jax import hugepages
def report(when):
  print(when, os.environ.get("GLIBC_TUNABLES", ""), sys.flags.dev_mode,
        sys.flags.optimize, sys.warnoptions, flush=True)
report("before")
hugepages.reexec(__name__)
report("after")
"""
_BASE_TUNABLES = "glibc.malloc.arena_max=4"
_WITH = f"{_BASE_TUNABLES}:{hugepages.TUNABLE}"


def _env(tmp_path, **extra):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "IRNET_JAX_HUGEPAGES", "COVERAGE_RUN")}
  env["GLIBC_TUNABLES"] = _BASE_TUNABLES  # kept, the tunable appended
  root = os.path.dirname(os.path.dirname(os.path.abspath(hugepages.__file__)))
  env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), root])
  env.update(extra)
  return env


def _run(tmp_path, args, env=None, stdin=None):
  (tmp_path / "hp_probe.py").write_text(_PROBE)
  out = subprocess.run([sys.executable, *args], env=env or _env(tmp_path), input=stdin,
                       capture_output=True, text=True, cwd=tmp_path, timeout=120, check=True)
  # (pdb prints its prompt on the same line as the program's output.)
  return [line[line.index(w):] for line in out.stdout.splitlines()
          for w in ("before", "after") if w in line]


needs_hugepages = pytest.mark.skipif(
    not hugepages.wanted({"GLIBC_TUNABLES": _BASE_TUNABLES}),
    reason="not Linux/glibc >= 2.35 with transparent huge pages: nothing to re-execute")


def test_opt_outs():
  assert not hugepages.wanted({"IRNET_JAX_HUGEPAGES": "0"})
  assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


def test_program_parses_the_command_line():
  py = sys.executable
  assert hugepages.program([py, "-X", "dev", "-W", "error", "-u", "-m", "a.b", "--x"]) == (
      "module", "a.b")
  assert hugepages.program([py, "-OO", "-mpkg"]) == ("module", "pkg")
  assert hugepages.program([py, "-X", "-m", "s.py"]) == ("script", "s.py")  # -X's value
  assert hugepages.program([py, "-B", "run.py", "-m", "x"]) == ("script", "run.py")
  assert hugepages.program([py, "-c", "import x", "-m", "y"]) is None
  assert hugepages.program([py, "-"]) is None
  assert hugepages.program([py]) is None


def test_why_not_names_each_reason(monkeypatch):
  # This pytest process is not the program on its command line; fake the parts each
  # check looks at, one at a time.
  assert "__main__ module" in hugepages.why_not("irnet_jax.main")
  monkeypatch.setattr(hugepages, "_runs_as_main", lambda prog, main: True)
  monkeypatch.setattr(sys, "gettrace", lambda: None)  # coverage tools set one
  monkeypatch.delitem(sys.modules, "coverage", raising=False)
  monkeypatch.delitem(sys.modules, "pdb", raising=False)
  monkeypatch.delitem(sys.modules, "IPython", raising=False)
  assert hugepages.why_not("__main__", {}) is None
  assert "coverage" in hugepages.why_not("__main__", {"COVERAGE_RUN": "true"})
  monkeypatch.setattr(hugepages, "_runs_as_main", lambda prog, main: False)
  assert "command line" in hugepages.why_not("__main__", {})


@needs_hugepages
def test_reexec_keeps_interpreter_flags_and_sets_the_tunable_once(tmp_path):
  out = _run(tmp_path, ["-X", "dev", "-W", "error::ResourceWarning", "-O", "-u",
                        "-m", "hp_probe"])
  flags = "True 1 ['default', 'error::ResourceWarning']"  # -X dev adds "default"
  # Re-executed once: "before" twice (without, then with the tunable), then "after".
  assert out == [f"before {_BASE_TUNABLES} {flags}", f"before {_WITH} {flags}",
                 f"after {_WITH} {flags}"]


@needs_hugepages
def test_reexec_of_a_script(tmp_path):
  out = _run(tmp_path, ["hp_probe.py"])
  assert [line.split()[:2] for line in out] == [
      ["before", _BASE_TUNABLES], ["before", _WITH], ["after", _WITH]]


@needs_hugepages
@pytest.mark.parametrize("case", ["trace", "coverage", "ipython", "pdb", "runpy"])
def test_no_reexec_under_tools_or_another_main(tmp_path, case):
  args = {"pdb": ["-m", "pdb", "-m", "hp_probe"],
          "runpy": ["-c", "import runpy; runpy.run_module('hp_probe', run_name='__main__')"]
          }.get(case, ["-m", "hp_probe", case])
  out = _run(tmp_path, args, stdin="continue\nquit\n" if case == "pdb" else None)
  assert [line.split()[:2] for line in out] == [["before", _BASE_TUNABLES],
                                                ["after", _BASE_TUNABLES]]


@needs_hugepages
def test_no_reexec_when_coverage_run_is_set(tmp_path):
  out = _run(tmp_path, ["-m", "hp_probe"], env=_env(tmp_path, COVERAGE_RUN="true"))
  assert [line.split()[0] for line in out] == ["before", "after"]
