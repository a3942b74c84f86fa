"""irnet_jax.cli: one command-line style for every ``python -m irnet_jax.*`` tool (main,
evaluate, convert, export, report, summary).

``--help`` works on each tool (exit 0, its flags with their help); an unknown flag, an
unknown ``--config.*`` field, a typo in a config file, a bad flag value and a stray
argument are each one ``error: ...`` line naming the nearest valid name, exit status 1
and no traceback; so are each tool's expected failures (a damaged run.json, a busy
workdir, ...), and --debug / IRNET_JAX_DEBUG=1 show the traceback instead. The subprocess
cases run together, 3 at a time, from one module fixture (each is an interpreter start
and a JAX import; none gets as far as compiling anything).
"""
import concurrent.futures
import io
import json
import logging
import os
import re
import subprocess
import sys
import types

import pytest

from irnet_jax import cli
from irnet_jax import workdir as workdir_lib

# Each tool with one of its own flags (which --help must list) and a misspelling of it.
TOOLS = {
    "irnet_jax.main": ("workdir", "wrokdir"),
    "irnet_jax.evaluate": ("workdir", "wrokdir"),
    "irnet_jax.convert": ("to_torch", "to_trch"),
    "irnet_jax.export": ("out", "outt"),
    "irnet_jax.report": ("compare", "compair"),
    "irnet_jax.summary": ("image_size", "image_szie"),
}
TYPO = "--config.optimizer.lerning_rate=0.1"
NEAREST = "did you mean --config.optimizer.learning_rate?"


def _style_cases(tmp):
  """{name: (argv after ``python -m``, extra environment, regex the one ``error:`` line
  must match; None for a --help case)}."""
  typo_file = tmp / "typo_config.py"
  typo_file.write_text("from irnet_jax.configs import quickstart\n\n\ndef get_config():\n"
                       "  c = quickstart.get_config()\n"
                       "  c.model.estimater = 'ste'\n  return c\n")
  workdir = str(tmp / "run")
  cases = {}
  for tool, (flag, typo) in TOOLS.items():
    cases[f"help_{tool}"] = ([tool, "--help"], {}, None)
    cases[f"unknown_flag_{tool}"] = (
        [tool, f"--{typo}=x"], {}, rf"^error: unknown flag --{typo}; did you mean --{flag}\?")
  cases.update({
      "main_config_typo": (["irnet_jax.main", "--config=quickstart", f"--workdir={workdir}",
                            TYPO], {}, re.escape(NEAREST)),
      "evaluate_config_typo": (["irnet_jax.evaluate", f"--workdir={workdir}", TYPO], {},
                               re.escape(NEAREST)),
      "convert_config_typo": (["irnet_jax.convert", "--config=quickstart",
                               f"--workdir={workdir}", TYPO], {}, re.escape(NEAREST)),
      "summary_config_typo": (["irnet_jax.summary", "--config=quickstart",
                               "--config.model.estimater=ste"], {},
                              re.escape("did you mean --config.model.estimator?")),
      "summary_config_file_typo": (["irnet_jax.summary", f"--config={typo_file}"], {},
                                   re.escape("did you mean config.model.estimator?")),
      "main_bad_value": (["irnet_jax.main", "--config=quickstart", f"--workdir={workdir}",
                          "--config.optimizer.learning_rate=abc"], {},
                         r"--config.optimizer.learning_rate=abc: could not convert"),
      "main_missing_workdir": (["irnet_jax.main", "--config=quickstart"], {},
                               r"--workdir must have a value"),
      "report_stray_argument": (["irnet_jax.report", f"--workdir={tmp}", "extra"], {},
                                r"unexpected arguments \['extra'\]"),
  })
  return cases


def _config_file(path, c, extra=""):
  """A config file returning ``c`` (plus ``extra`` lines in get_config)."""
  path.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                  f"  c = ml_collections.ConfigDict(json.loads({c.to_json()!r}))\n"
                  f"{extra}  return c\n")
  return str(path)


def _failure_cases(tmp, npz, tiny_config):
  """{name: (argv after ``python -m``, extra environment, regex stderr must match)}: the
  expected failures of each tool."""
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
      "main_workdir_busy": (  # runs() holds its lock, as a run training there would.
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
          ["irnet_jax.summary", "--model=resnet99"], {},
          r"unknown model 'resnet99'; did you mean .*package.module:factory"),
      "main_cadence_not_a_multiple_of_the_call": (
          ["irnet_jax.main", "--config=quickstart", f"--workdir={tmp / 'cadence_run'}",
           "--config.steps_per_call=8"], {},
          "log_every_steps=20 is not a multiple of config.steps_per_call=8"),
      "main_unknown_model_name": (
          ["irnet_jax.main", "--config=quickstart", f"--workdir={tmp / 'model_run'}",
           "--config.model.name=resnet99"], {}, "model.name"),
      "report_debug_flag": (
          ["irnet_jax.report", f"--workdir={empty}", "--debug"], {}, "Traceback"),
      "report_debug_env": (
          ["irnet_jax.report", f"--workdir={empty}"], {"IRNET_JAX_DEBUG": "1"}, "Traceback"),
  }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, toy_npz, tiny_config, repo_root):
  """{case: (CompletedProcess, expected, tmp)} for every case of :func:`_style_cases` and
  :func:`_failure_cases`, run 3 at a time."""
  tmp = tmp_path_factory.mktemp("cli")
  cases = {**_style_cases(tmp), **_failure_cases(tmp, toy_npz, tiny_config)}
  assert sorted(cases) == sorted([f"help_{tool}" for tool in TOOLS] + ERROR_CASES
                                 + FAILURE_CASES)

  def run(name):
    argv, env, _ = cases[name]
    return subprocess.run([sys.executable, "-m", *argv], cwd=repo_root, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **env})

  # The lock of busy/ is held, as a run training there would.
  with workdir_lib.WorkdirLock(str(tmp / "busy")), \
      concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = dict(zip(cases, pool.map(run, cases)))
  assert not os.path.exists(tmp / "run")  # No style case got as far as making its workdir.
  return {name: (results[name], cases[name][2], tmp) for name in cases}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_lists_the_flags_and_exits_0(runs, tool):
  proc, _, _ = runs[f"help_{tool}"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  flag = TOOLS[tool][0]
  assert re.search(rf"^  --{flag}: \S", proc.stdout, re.M), proc.stdout[-3000:]
  assert "--[no]debug: Show the traceback" in proc.stdout
  # Plain text: no reST markup, and no library documentation before the usage.
  assert "``" not in proc.stdout and not re.search(r":(func|mod|class|data):`", proc.stdout)
  assert f"python -m {tool}" in proc.stdout.split("flags:")[0], proc.stdout[:2000]
  if tool == "irnet_jax.main":
    assert "--print-config" in proc.stdout
  if tool in ("irnet_jax.main", "irnet_jax.convert", "irnet_jax.summary",
              "irnet_jax.evaluate"):
    assert re.search(r"^  --config: \S", proc.stdout, re.M)


ERROR_CASES = ([f"unknown_flag_{tool}" for tool in sorted(TOOLS)]
               + ["main_config_typo", "evaluate_config_typo", "convert_config_typo",
                  "summary_config_typo", "summary_config_file_typo", "main_bad_value",
                  "main_missing_workdir", "report_stray_argument"])


@pytest.mark.parametrize("case", ERROR_CASES)
def test_mistakes_are_one_line_naming_the_nearest_name(runs, case):
  proc, expected, _ = runs[case]
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert re.search(expected, errors[0]), errors[0]


# Each CLI once or more (the launcher: a config file typo, a damaged run.json, a workdir
# another run holds, one it cannot create), and both ways to ask for the traceback
# (report: no JAX import).
FAILURE_CASES = ["main_config_file_typo", "main_damaged_run_json", "main_workdir_busy",
              "main_workdir_not_writable", "main_cadence_not_a_multiple_of_the_call",
              "main_unknown_model_name",
              "evaluate_damaged_config_json", "convert_damaged_config_json",
              "export_no_checkpoint", "report_no_metrics", "summary_unknown_model",
              "report_debug_flag", "report_debug_env"]


@pytest.mark.parametrize("case", FAILURE_CASES)
def test_cli_expected_failures_are_one_error_line(runs, case):
  proc, expected, tmp = runs[case]
  assert proc.returncode != 0, (case, proc.stdout[-2000:])
  assert re.search(expected, proc.stderr), (case, proc.stderr[-3000:])
  if case.endswith(("_flag", "_env")):
    return  # --debug / IRNET_JAX_DEBUG=1: the traceback, asserted above.
  assert "Traceback" not in proc.stderr, (case, proc.stderr[-3000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, (case, proc.stderr[-3000:])
  if case == "main_config_file_typo":
    assert not os.path.exists(tmp / "typo_run")  # Refused before the workdir was made.
  if case == "main_cadence_not_a_multiple_of_the_call":
    assert not os.path.exists(tmp / "cadence_run")
  if case == "main_workdir_busy":  # Refused before writing anything, the lock untouched.
    assert os.listdir(tmp / "busy") == [".lock"]
    assert json.load(open(tmp / "busy" / ".lock"))["pid"] == os.getpid()
  if case == "main_damaged_run_json":
    assert (tmp / "damaged_run" / "run.json").read_text() == '{"fields": {"seed"'


def test_tracebacks_logged_by_libraries_become_one_line():
  # Orbax's checkpoint thread logs the OSError of a full disk, traceback and all, before
  # the error reaches the tool (which prints its own one line).
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  handler.addFilter(cli.drop_tracebacks)
  logger = logging.getLogger("orbax.test_cli")
  logger.addHandler(handler)
  try:
    try:
      raise OSError(28, "No space left on device", "/w/checkpoints/8.orbax-checkpoint-tmp")
    except OSError:
      logger.exception("Error in async save of step %d", 8)
  finally:
    logger.removeHandler(handler)
  text = stream.getvalue()
  assert text.count("\n") == 1 and "Traceback" not in text, text
  assert "Error in async save of step 8" in text and "No space left on device" in text


def test_a_full_disk_reported_by_a_library_is_one_line_with_the_hint(capsys):
  # What Orbax raises on a full disk (tensorstore's message, a ValueError), and what
  # its writer threads leave behind: the error line leads with the OS error and its fix;
  # a hundred identical thread exceptions are one warning.
  error = ValueError('RESOURCE_EXHAUSTED: Error writing "bn1.mean.value/0" in OCDBT '
                     'database ...: No space left on device [os_error_code=\'28\']')
  line = workdir_lib.error_line(error)
  assert line.startswith("error: No space left on device; the disk is full: free space "
                         "and rerun the same command"), line
  for _ in range(100):  # What threading.excepthook / sys.unraisablehook are given.
    cli._one_line_once(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed")))
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "warning: RuntimeError: Event loop is closed" in err


def test_one_command_runs_every_tool(repo_root, tmp_path):
  # `irnet-jax COMMAND` (the console script) is `python -m irnet_jax COMMAND`.
  def run(*args):
    return subprocess.run([sys.executable, "-m", "irnet_jax", *args], cwd=repo_root,
                          capture_output=True, text=True, timeout=120)

  listing = run("--help")
  assert listing.returncode == 0
  for command in ("train", "evaluate", "convert", "export", "report", "summary"):
    assert f"irnet-jax {command} " in listing.stdout
  typo = run("trian", "--config=quickstart")
  assert typo.returncode == 1 and "did you mean train?" in typo.stderr
  report = run("report", f"--workdir={tmp_path}")  # The tool itself answers.
  assert report.returncode == 1 and "has no metrics.jsonl" in report.stderr
