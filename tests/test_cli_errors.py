"""Every bad input is one line: config validation before anything is written, and every
CLI (main, evaluate, convert, export, report, summary) turning expected failures into
`error: ...` on stderr and a non-zero exit (--debug / IRNET_JAX_DEBUG=1: the traceback).

The CLI cases run as subprocesses, started together by one module fixture (each is an
interpreter start and a JAX import; none gets as far as compiling), so the whole file
costs about as much as a few of them in a row.
"""
import concurrent.futures
import json
import os
import subprocess
import sys

import pytest

from irnet_jax import config as config_lib
from irnet_jax import train
from irnet_jax import workdir as workdir_lib

# ------------------------------------------------------------------ config validation


def _with(**fields):
  """base_config() with dotted ``fields`` set, unknown ones included (as a config file
  can: ``c.optimizer.learning_rat = 0.1`` adds a field)."""
  c = config_lib.base_config()
  for dotted, value in fields.items():
    *parents, leaf = dotted.split(".")
    node = c
    for p in parents:
      node = node[p]
    with node.unlocked():
      if leaf in node:
        del node[leaf]  # Type-safe ConfigDicts refuse a value of another type.
      node[leaf] = value
  return c


@pytest.mark.parametrize("fields,message", [
    ({"optimizer.learning_rat": 0.1},
     r"config.optimizer.learning_rat is not a config field.*did you mean "
     r"config.optimizer.learning_rate\?"),
    ({"learning_rate": 0.1}, r"config.learning_rate .*did you mean config.optimizer.learning_rate"),
    ({"ede.zzz": 1}, r"config.ede.zzz .*the fields of config.ede are .*t_max"),
    ({"keep_checkpoints": 0}, r"config.keep_checkpoints=0 must be >= 1"),
    ({"seed": -1}, r"config.seed=-1 must be in \[0, 4294967295\]"),
    ({"seed": 1.5}, r"config.seed=1.5 \(float\) must be an integer"),
    ({"ede.t_max": float("inf")}, r"config.ede.t_max=inf is not finite"),
    ({"optimizer.learning_rate": float("nan")}, r"learning_rate=nan is not finite"),
    ({"optimizer.momentum": -0.9}, r"config.optimizer.momentum=-0.9 must be >= 0"),
    ({"optimizer.momentum": 1.0}, r"momentum=1.0 must be < 1"),
    ({"optimizer.weight_decay": -1e-4}, r"config.optimizer.weight_decay=-0.0001 must be >= 0"),
    ({"batch_size": "128"}, r"config.batch_size='128' \(str\) must be an integer"),
    ({"progress_bar": 1}, r"config.progress_bar=1 \(int\) must be True or False"),
    ({"dataset.mean": (0.5, "x", 0.5)}, r"config.dataset.mean=.* must be a tuple of numbers"),
    ({"dataset.std": (0.2, 0.0, 0.2)}, r"config.dataset.std=.*must be > 0"),
    ({"optimizer": 0.1}, r"config.optimizer=0.1 replaces the whole section"),
])
def test_validate_names_the_field_the_value_and_the_fix(fields, message):
  with pytest.raises(config_lib.ConfigError, match=message):
    config_lib.validate(_with(**fields))


def test_validate_accepts_what_configs_use():
  # Ints for floats, lists for tuples (config.json), fractional epochs, the ImageNet recipe.
  config_lib.validate(_with(**{"optimizer.learning_rate": 1, "dataset.mean": [0.5] * 3,
                               "num_epochs": 0.5, "profile_steps": "2,4"}))
  config_lib.validate(config_lib.imagenet_config("resnet18"))


@pytest.mark.parametrize("override", [{"seed": -1}, {"keep_checkpoints": 0},
                                      {"ede.t_max": float("inf")}])
def test_bad_values_are_refused_before_the_workdir_is_made(tmp_path, override, toy_npz,
                                                          tiny_config):
  # seed=-1 used to pass validation and fail after run.json was written.
  with pytest.raises(config_lib.ConfigError):
    train.train_and_evaluate(tiny_config(toy_npz, **override), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


# ------------------------------------------------------------------ the CLIs


def _config_file(path, c, extra=""):
  """A config file returning ``c`` (plus ``extra`` lines in get_config)."""
  path.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                  f"  c = ml_collections.ConfigDict(json.loads({c.to_json()!r}))\n"
                  f"{extra}  return c\n")
  return str(path)


def _cases(tmp, npz, tiny_config):
  """{name: (argv after `python -m`, extra environment, text stderr must hold)}."""
  c = tiny_config(npz, num_train_steps=2)
  good = _config_file(tmp / "good.py", c)
  typo = _config_file(tmp / "typo.py", c, "  c.optimizer.learning_rat = 0.1\n")
  damaged_run = tmp / "damaged_run"
  damaged_run.mkdir()
  (damaged_run / "run.json").write_text('{"fields": {"seed"')
  damaged_config = tmp / "damaged_config"
  damaged_config.mkdir()
  (damaged_config / "config.json").write_text("\x00garbage")
  no_checkpoint = tmp / "no_checkpoint"
  no_checkpoint.mkdir()
  c.model.num_classes = 4
  (no_checkpoint / "config.json").write_text(c.to_json())
  (tmp / "a_file").write_text("")
  empty = tmp / "empty"
  empty.mkdir()
  main = ["irnet_jax.main", f"--config={good}"]
  return {
      "main_config_file_typo": (
          ["irnet_jax.main", f"--config={typo}", f"--workdir={tmp / 'typo_run'}"], {},
          "did you mean config.optimizer.learning_rate?"),
      "main_damaged_run_json": (
          main + [f"--workdir={damaged_run}"], {}, "run.json is damaged"),
      "main_workdir_busy": (  # cli_runs holds its lock, as a run training there would.
          main + [f"--workdir={tmp / 'busy'}"], {}, r"busy is in use: .* locked by pid"),
      "main_workdir_not_writable": (
          main + [f"--workdir={tmp / 'a_file' / 'run'}"], {}, "Not a directory"),
      "evaluate_damaged_config_json": (
          ["irnet_jax.evaluate", f"--workdir={damaged_config}"], {}, "config.json is damaged"),
      "convert_damaged_config_json": (  # Without torch installed: that is the one line.
          ["irnet_jax.convert", f"--workdir={damaged_config}", f"--to_torch={tmp / 'x.pth'}"],
          {}, "config.json is damaged|needs torch"),
      "export_no_checkpoint": (
          ["irnet_jax.export", f"--workdir={no_checkpoint}", f"--out={tmp / 'm.irnet'}"], {},
          "no checkpoint in"),
      "report_no_metrics": (
          ["irnet_jax.report", f"--workdir={empty}"], {}, "has no metrics.jsonl"),
      "summary_unknown_model": (
          ["irnet_jax.summary", "--model=resnet99"], {}, "unknown model 'resnet99'"),
      "report_debug_flag": (
          ["irnet_jax.report", f"--workdir={empty}", "--debug"], {}, "Traceback"),
      "report_debug_env": (
          ["irnet_jax.report", f"--workdir={empty}"], {"IRNET_JAX_DEBUG": "1"}, "Traceback"),
  }


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory, toy_npz, tiny_config, repo_root):
  """{case: (CompletedProcess, expected text, tmp)} for every case, run 3 at a time."""
  tmp = tmp_path_factory.mktemp("cli")
  cases = _cases(tmp, toy_npz, tiny_config)
  assert sorted(cases) == sorted(CASE_NAMES)

  def run(name):
    argv, env, _ = cases[name]
    return subprocess.run([sys.executable, "-m", *argv], cwd=repo_root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})

  with workdir_lib.WorkdirLock(str(tmp / "busy")), \
      concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = dict(zip(cases, pool.map(run, cases)))
  return {name: (results[name], cases[name][2], tmp) for name in cases}


# Each CLI once or more (the launcher: a config file typo, a damaged run.json, a workdir
# another run holds, one it cannot create), and both ways to ask for the traceback
# (report: no JAX import).
CASE_NAMES = ["main_config_file_typo", "main_damaged_run_json", "main_workdir_busy",
              "main_workdir_not_writable",
              "evaluate_damaged_config_json", "convert_damaged_config_json",
              "export_no_checkpoint", "report_no_metrics", "summary_unknown_model",
              "report_debug_flag", "report_debug_env"]


@pytest.mark.parametrize("case", CASE_NAMES)
def test_cli_expected_failures_are_one_error_line(cli_runs, case):
  import re  # pylint: disable=import-outside-toplevel
  proc, expected, tmp = cli_runs[case]
  assert proc.returncode != 0, (case, proc.stdout[-2000:])
  assert re.search(expected, proc.stderr), (case, proc.stderr[-3000:])
  if case.endswith(("_flag", "_env")):
    return  # --debug / IRNET_JAX_DEBUG=1: the traceback, asserted above.
  assert "Traceback" not in proc.stderr, (case, proc.stderr[-3000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, (case, proc.stderr[-3000:])
  if case == "main_config_file_typo":
    assert not os.path.exists(tmp / "typo_run")  # Refused before the workdir was made.
  if case == "main_workdir_busy":  # Refused before writing anything, the lock untouched.
    assert os.listdir(tmp / "busy") == [".lock"]
    assert json.load(open(tmp / "busy" / ".lock"))["pid"] == os.getpid()
  if case == "main_damaged_run_json":
    assert (tmp / "damaged_run" / "run.json").read_text() == '{"fields": {"seed"'



def test_export_out_in_a_missing_directory_is_said_before_restoring(tmp_path):
  # pylint: disable-next=import-outside-toplevel
  from irnet_jax.export.workdir import export_workdir
  with pytest.raises(FileNotFoundError) as e:  # tmp_path holds no run: nothing restored.
    export_workdir(str(tmp_path), str(tmp_path / "nowhere" / "m.irnet"))
  assert workdir_lib.error_line(e.value).startswith(
      "error: the directory of --out does not exist")


def test_error_lines_of_os_errors_name_the_path_and_what_to_do():
  import errno  # pylint: disable=import-outside-toplevel
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/checkpoints/100")
  assert workdir_lib.error_line(full) == (
      "error: No space left on device: /w/checkpoints/100; the disk is full: free space "
      "and rerun the same command (what was written before, checkpoints included, is "
      "kept).")
  read_only = PermissionError(errno.EROFS, os.strerror(errno.EROFS), "/w/metrics.jsonl")
  assert "read-only" in workdir_lib.error_line(read_only)
  # A library's message (not one of ours, which name the fix): how to see where.
  try:
    json.loads("{")
  except ValueError as e:
    line = workdir_lib.error_line(e)
  assert line.startswith("error: JSONDecodeError: ") and "--debug" in line
