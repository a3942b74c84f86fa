"""irnet_jax.config: validation names the field, the value and the fix (a typo gets the
nearest field) before anything is written; the configs' plain fields."""
import subprocess
import sys

import pytest

from irnet_jax import config as config_lib

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


@pytest.mark.parametrize("field,nearest", [
    ("optimizer.lerning_rate", "optimizer.learning_rate"),
    ("learning_rate", "optimizer.learning_rate"),       # The right name, another section.
    ("optimiser.learning_rate", "optimizer.learning_rate"),
    ("model.estimater", "model.estimator"),
    ("ede.zzz", None),
])
def test_nearest_field(field, nearest):
  assert config_lib.nearest_field(field, config_lib.field_names()) == nearest


def test_ede_schedule_by_is_a_plain_field():
  # `ede.update` was a ConfigDict method name: `c.ede.update == "epoch"` was always False.
  c = config_lib.base_config()
  assert c.ede.schedule_by == "epoch"
  assert config_lib.imagenet_config("resnet18").ede.schedule_by == "step"
  assert "update" not in c.ede


def test_print_config_lists_every_field_with_its_value_and_meaning(repo_root):
  out = subprocess.run([sys.executable, "-m", "irnet_jax.main", "--print-config",
                        "--config=quickstart"], cwd=repo_root, capture_output=True,
                       text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  lines = {line.split()[0]: line for line in out.stdout.splitlines()
           if line.strip().startswith("--config.")}
  for field in config_lib.field_names():
    line = next((v for k, v in lines.items() if k.startswith(f"--config.{field}=")), None)
    assert line is not None, field
    assert len(line.split(None, 1)) == 2, f"{field} has no meaning: {line!r}"
  assert "--config.num_epochs=40" in lines  # quickstart's value, not the default
