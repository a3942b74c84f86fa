"""irnet_jax.configs: the packaged recipes by name, and --config=NAME or a path."""
import os
import subprocess
import sys

import pytest

from irnet_jax import config as config_lib
from irnet_jax import configs


def test_every_config_loads_and_validates():
  assert len(configs.names()) >= 15
  for name in configs.names():
    c = configs.get_config(name)
    config_lib.validate(c, num_devices=1)
    assert configs.summary(name), f"{name} has no docstring naming its paper row"
    for field in ("seed", "num_epochs", "num_train_steps", "batch_size",
                  "checkpoint_every_steps", "eval_every_steps"):
      assert field in c, (name, field)


def test_names_are_the_packaged_files():
  here = os.path.dirname(configs.__file__)
  files = sorted(f[:-3] for f in os.listdir(here) if f.endswith(".py") and f != "__init__.py")
  assert configs.names() == files
  assert {"quickstart", "cifar10_resnet20", "imagenet_resnet18"} <= set(files)


def test_resolve_a_name_keeps_the_argument_suffix():
  path = configs.resolve("quickstart")
  assert path == os.path.join(os.path.dirname(configs.__file__), "quickstart.py")
  assert configs.resolve("cifar10_resnet20:arg") == configs.path("cifar10_resnet20") + ":arg"


def test_resolve_a_path_of_ones_own(tmp_path, monkeypatch):
  own = tmp_path / "my_config.py"
  own.write_text("def get_config():\n  return None\n")
  assert configs.resolve(str(own)) == str(own)
  assert configs.resolve(f"{own}:x") == f"{own}:x"
  monkeypatch.chdir(tmp_path)
  assert configs.resolve("my_config.py") == "my_config.py"  # Relative to the cwd.
  # A file in the cwd named like a recipe, without .py, is the user's own.
  (tmp_path / "quickstart").write_text("")
  assert configs.resolve("quickstart") == "quickstart"


def test_unknown_name_and_missing_file_name_the_fix():
  with pytest.raises(FileNotFoundError, match=r"did you mean --config=quickstart\?"):
    configs.resolve("quickstrat")
  with pytest.raises(FileNotFoundError, match="ship in the package: --config=quickstart"):
    configs.resolve("configs/quickstart.py")
  with pytest.raises(FileNotFoundError, match="nope.py does not exist"):
    configs.resolve("nope.py")


def test_get_config_returns_a_fresh_config():
  a, b = configs.get_config("quickstart"), configs.get_config("quickstart")
  assert a.dataset.name == "digits" and a is not b
  a.seed = 123
  assert configs.get_config("quickstart").seed != 123


def test_listing_has_one_line_per_recipe():
  lines = configs.listing().splitlines()
  assert [line.split()[0] for line in lines] == configs.names()
  assert all(len(line.split(None, 1)) == 2 for line in lines)
  assert configs.summary("quickstart").startswith("Quickstart: a binary (1w1a) ResNet-20")


def test_launcher_lists_and_rejects_by_name(tmp_path):
  listed = subprocess.run([sys.executable, "-m", "irnet_jax.main", "--list-configs"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60)
  assert listed.returncode == 0 and listed.stdout.strip() == configs.listing()
  typo = subprocess.run([sys.executable, "-m", "irnet_jax.main", "--config=quickstrat",
                         f"--workdir={tmp_path / 'w'}"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
  assert typo.returncode == 1
  assert typo.stderr.strip().splitlines()[-1].startswith(
      "error: no packaged config named 'quickstrat': did you mean --config=quickstart?")
  assert not (tmp_path / "w").exists()
