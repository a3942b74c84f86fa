"""irnet_jax.cli: one command-line style for every ``python -m irnet_jax.*`` tool.

``--help`` works on each tool (exit 0, its flags with their help); an unknown flag, an
unknown ``--config.*`` field, a typo in a config file, a bad flag value and a stray
argument are each one ``error: ...`` line naming the nearest valid name, exit status 1
and no traceback. The subprocess cases run together, 3 at a time, from one module fixture
(each is an interpreter start; none gets as far as compiling anything).
"""
import concurrent.futures
import os
import re
import subprocess
import sys

import pytest

from irnet_jax import config as config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

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


def _cases(tmp):
  """{name: (argv after ``python -m``, regex the one ``error:`` line must match; None
  for a --help case)}."""
  typo_file = tmp / "typo_config.py"
  typo_file.write_text("from irnet_jax.configs import quickstart\n\n\ndef get_config():\n"
                       "  c = quickstart.get_config()\n"
                       "  c.model.estimater = 'ste'\n  return c\n")
  workdir = str(tmp / "run")
  cases = {}
  for tool, (flag, typo) in TOOLS.items():
    cases[f"help_{tool}"] = ([tool, "--help"], None)
    cases[f"unknown_flag_{tool}"] = (
        [tool, f"--{typo}=x"], rf"^error: unknown flag --{typo}; did you mean --{flag}\?")
  cases.update({
      "main_config_typo": (["irnet_jax.main", "--config=quickstart", f"--workdir={workdir}",
                            TYPO], re.escape(NEAREST)),
      "evaluate_config_typo": (["irnet_jax.evaluate", f"--workdir={workdir}", TYPO],
                               re.escape(NEAREST)),
      "convert_config_typo": (["irnet_jax.convert", "--config=quickstart",
                               f"--workdir={workdir}", TYPO], re.escape(NEAREST)),
      "summary_config_typo": (["irnet_jax.summary", "--config=quickstart",
                               "--config.model.estimater=ste"],
                              re.escape("did you mean --config.model.estimator?")),
      "summary_config_file_typo": (["irnet_jax.summary", f"--config={typo_file}"],
                                   re.escape("did you mean config.model.estimator?")),
      "main_bad_value": (["irnet_jax.main", "--config=quickstart", f"--workdir={workdir}",
                          "--config.optimizer.learning_rate=abc"],
                         r"--config.optimizer.learning_rate=abc: could not convert"),
      "main_missing_workdir": (["irnet_jax.main", "--config=quickstart"],
                               r"--workdir must have a value"),
      "report_stray_argument": (["irnet_jax.report", f"--workdir={tmp}", "extra"],
                                r"unexpected arguments \['extra'\]"),
  })
  return cases


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{case: (CompletedProcess, expected)} for every case of :func:`_cases`."""
  tmp = tmp_path_factory.mktemp("cli")
  cases = _cases(tmp)
  assert sorted(cases) == sorted([f"help_{tool}" for tool in TOOLS] + ERROR_CASES)

  def run(name):
    return subprocess.run([sys.executable, "-m", *cases[name][0]], cwd=REPO,
                          capture_output=True, text=True, timeout=300)

  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    results = dict(zip(cases, pool.map(run, cases)))
  assert not os.path.exists(tmp / "run")  # No case got as far as making its workdir.
  return {name: (results[name], cases[name][1]) for name in cases}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_help_lists_the_flags_and_exits_0(runs, tool):
  proc, _ = runs[f"help_{tool}"]
  assert proc.returncode == 0, proc.stderr[-3000:]
  flag = TOOLS[tool][0]
  assert re.search(rf"^  --{flag}: \S", proc.stdout, re.M), proc.stdout[-3000:]
  assert "--[no]debug: Show the traceback" in proc.stdout
  if tool in ("irnet_jax.main", "irnet_jax.convert", "irnet_jax.summary",
              "irnet_jax.evaluate"):
    assert re.search(r"^  --config: \S", proc.stdout, re.M)


ERROR_CASES = ([f"unknown_flag_{tool}" for tool in sorted(TOOLS)]
               + ["main_config_typo", "evaluate_config_typo", "convert_config_typo",
                  "summary_config_typo", "summary_config_file_typo", "main_bad_value",
                  "main_missing_workdir", "report_stray_argument"])


@pytest.mark.parametrize("case", ERROR_CASES)
def test_mistakes_are_one_line_naming_the_nearest_name(runs, case):
  proc, expected = runs[case]
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert re.search(expected, errors[0]), errors[0]


@pytest.mark.parametrize("field,nearest", [
    ("optimizer.lerning_rate", "optimizer.learning_rate"),
    ("learning_rate", "optimizer.learning_rate"),       # The right name, another section.
    ("optimiser.learning_rate", "optimizer.learning_rate"),
    ("model.estimater", "model.estimator"),
    ("ede.zzz", None),
])
def test_nearest_field(field, nearest):
  assert config_lib.nearest_field(field, config_lib.field_names()) == nearest
