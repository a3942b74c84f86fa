"""The wheel as a user gets it: built, installed into a fresh venv, run from elsewhere.

No download: the wheel is built without build isolation and installed with
``--no-index --no-deps``; the venv sees this environment's packages through a .pth
file (a venv made by ``--system-site-packages`` would see the base interpreter's, not
this venv's). Packages of the extras other than ``[train]`` are hidden from it, so the
quickstart runs with what ``pip install "irnet_jax[train]"`` installs.
"""
import email.parser
import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent

# Top-level modules of the extras a `pip install "irnet_jax[train]"` does not have
# (array_record is one of grain's dependencies).
NOT_IN_TRAIN = ("tensorflow_datasets", "tensorflow", "matplotlib", "torch",
                "pytest", "chex", "nbclient", "nbformat", "ipykernel", "tensorboard")

# ... and those of [train] itself: the core must do without them.
TRAIN = ("grain", "array_record", "PIL", "tqdm", "tensorboardX", "sklearn")

_BLOCKER = '''"""Hides the packages of irnet_jax's extras (tests/test_packaging.py): the path
finder does not see them, as if they were not installed."""
import importlib.machinery
import sys

HIDDEN = {hidden!r}
_PATH_FINDER = importlib.machinery.PathFinder


class _PathFinderWithout:
  @classmethod
  def find_spec(cls, name, path=None, target=None):
    if name.split(".")[0] in HIDDEN:
      return None
    return _PATH_FINDER.find_spec(name, path, target)

  @classmethod
  def invalidate_caches(cls):
    _PATH_FINDER.invalidate_caches()


sys.meta_path[:] = [_PathFinderWithout if f is _PATH_FINDER else f for f in sys.meta_path]
'''


def test_core_imports_without_the_extras():
  """``import irnet_jax`` and its ops, layers and models need the core dependencies only."""
  code = (_BLOCKER.format(hidden=NOT_IN_TRAIN + TRAIN) + "\nimport irnet_jax, irnet_jax.ops, "
          "irnet_jax.layers, irnet_jax.models\nimport importlib.util\n"
          "assert importlib.util.find_spec('PIL') is None\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.parametrize("tool,extra,argv", [
    ("irnet_jax.main", "train", ["--config=quickstart", "--workdir={tmp}/run"]),
    ("irnet_jax.evaluate", "train", ["--workdir={tmp}/run"]),
    ("irnet_jax.report", "plots", ["--workdir={tmp}/run"]),
], ids=["main", "evaluate", "report"])
def test_a_tool_without_its_extra_says_which_to_install(tool, extra, argv, tmp_path):
  # `pip install .` (the core) and then a tool of an extra: one line naming it, before
  # anything is made (report's folder included), no traceback.
  hidden = NOT_IN_TRAIN + TRAIN if extra == "train" else NOT_IN_TRAIN
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "metrics.jsonl").write_text(
      '{"step": 1, "split": "train", "loss": 1.0}\n')
  code = (_BLOCKER.format(hidden=hidden) + "\nimport runpy\n"
          f"sys.argv = [{tool!r}] + {[a.format(tmp=tmp_path) for a in argv]!r}\n"
          f"runpy.run_module({tool!r}, run_name='__main__', alter_sys=True)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr[-3000:]
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and f'pip install "irnet_jax[{extra}]"' in errors[0], out.stderr
  assert sorted(os.listdir(tmp_path / "run")) == ["metrics.jsonl"]


@pytest.mark.parametrize("tool,argv", [
    ("irnet_jax.summary", ["--model=resnet20", "--image_size=8"]),
    ("irnet_jax.export", ["--help"]),
], ids=["summary", "export"])
def test_the_core_tools_run_without_any_extra(tool, argv):
  code = (_BLOCKER.format(hidden=NOT_IN_TRAIN + TRAIN) + "\nimport runpy\n"
          f"sys.argv = [{tool!r}] + {argv!r}\n"
          f"runpy.run_module({tool!r}, run_name='__main__', alter_sys=True)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]


def _build_wheel(tmp_path: pathlib.Path) -> pathlib.Path:
  """The wheel of a copy of the sources (setuptools writes build/ and egg-info beside
  them, which the checkout should not get)."""
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md", "LICENSE"):
    shutil.copy(REPO / name, src / name)
  shutil.copytree(REPO / "irnet_jax", src / "irnet_jax",
                  ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so"))
  dist = tmp_path / "dist"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                  "--no-index", "-q", "-w", str(dist), str(src)], check=True,
                 capture_output=True, text=True, timeout=300)
  (wheel,) = dist.glob("irnet_jax-*.whl")
  return wheel


def _requires(wheel: pathlib.Path) -> dict[str, set[str]]:
  """extra ("" for the core) -> the project names it requires, from the wheel's METADATA."""
  with zipfile.ZipFile(wheel) as z:
    (meta,) = [n for n in z.namelist() if n.endswith(".dist-info/METADATA")]
    msg = email.parser.Parser().parsestr(z.read(meta).decode())
  out: dict[str, set[str]] = {}
  for req in msg.get_all("Requires-Dist"):
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0).lower().replace("_", "-")
    extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
    out.setdefault(extra.group(1) if extra else "", set()).add(name)
  return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
  """The wheel, built once for the file's tests."""
  return _build_wheel(tmp_path_factory.mktemp("wheel"))


def test_wheel_metadata_and_contents(wheel):
  req = _requires(wheel)
  assert req[""] == {"jax", "flax", "optax", "numpy", "ml-collections", "orbax-checkpoint",
                     "absl-py"}
  assert {"grain", "pillow", "tqdm", "tensorboardx", "scikit-learn"} == req["train"]
  assert "tensorflow-datasets" in req["tfds"] and req["torch"] == {"torch"}
  assert req["plots"] == {"matplotlib"} and {"pytest", "ruff"} <= req["dev"]
  with zipfile.ZipFile(wheel) as z:
    names = set(z.namelist())
  assert "irnet_jax/configs/quickstart.py" in names
  assert "irnet_jax/configs/cifar10_resnet20.py" in names
  assert "irnet_jax/kernels/csrc/binary_conv.cc" in names
  assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)
  with zipfile.ZipFile(wheel) as z:
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    assert "irnet-jax = irnet_jax.__main__:main" in z.read(entry_points).decode()


@pytest.mark.slow
def test_wheel_in_a_fresh_venv_runs_the_quickstart_from_another_directory(wheel, tmp_path):
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                  str(venv)], check=True, timeout=120)
  python = str(venv / "bin" / "python")
  purelib = pathlib.Path(subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True, capture_output=True, text=True).stdout.strip())
  # This environment's packages (jax, flax, grain, ...), after the venv's own: plain
  # paths, so this environment's .pth files (the editable install of the checkout) do
  # not run there.
  (purelib / "_irnet_test_parent_env.pth").write_text(
      "\n".join(p for p in site.getsitepackages() if os.path.isdir(p)) + "\n")
  (purelib / "_irnet_test_hide_extras.py").write_text(_BLOCKER.format(hidden=NOT_IN_TRAIN))
  (purelib / "_irnet_test_hide_extras.pth").write_text("import _irnet_test_hide_extras\n")
  # --ignore-installed: never touches the editable install this environment has.
  subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "-q",
                  "--no-deps", "--no-build-isolation", "--no-index", "--ignore-installed",
                  str(wheel)], check=True, capture_output=True, text=True, timeout=300)

  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  env["JAX_PLATFORMS"] = "cpu"

  def run(*args, timeout=120):
    return subprocess.run([python, *args], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=timeout)

  where = run("-c", "import irnet_jax; print(irnet_jax.__file__)")
  assert where.returncode == 0, where.stderr
  assert pathlib.Path(where.stdout.strip()).is_relative_to(purelib), where.stdout
  hidden = run("-c", "import importlib.util; print(importlib.util.find_spec('matplotlib'))")
  assert hidden.stdout.strip() == "None", (hidden.stdout, hidden.stderr)

  listed = run("-m", "irnet_jax.main", "--list-configs")
  assert listed.returncode == 0, listed.stderr
  lines = dict(line.split(None, 1) for line in listed.stdout.splitlines())
  assert {"quickstart", "cifar10_resnet20", "imagenet_resnet18"} <= set(lines)
  assert lines["quickstart"].startswith("Quickstart:")

  workdir = elsewhere / "w"
  out = run("-m", "irnet_jax.main", "--config=quickstart", f"--workdir={workdir}",
            "--config.num_train_steps=4", "--config.batch_size=16",
            "--config.eval_batch_size=120", "--config.log_every_steps=2",
            "--config.checkpoint_every_steps=4", "--config.analysis_every_steps=0",
            "--config.progress_bar=False", "--config.dataset.num_threads=0", timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  accuracy = re.search(r"test_accuracy=([0-9.]+)", out.stdout)
  assert accuracy, out.stdout
  assert 0.0 <= float(accuracy.group(1)) <= 1.0
  assert (workdir / "final_metrics.json").is_file()
