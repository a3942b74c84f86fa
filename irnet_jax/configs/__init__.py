"""The packaged experiment recipes, by name: ``--config=quickstart``.

Each ``NAME.py`` here defines ``get_config()`` (starting from
:func:`irnet_jax.config.base_config`) and says in the first sentence of its docstring
which row of the paper it reproduces. The launchers take ``--config=NAME`` (a recipe
here, after ``pip install`` too) or ``--config=PATH.py`` (a file of your own, e.g. a
copy of one of these); both keep ml_collections' ``:ARG`` suffix (passed to
``get_config``) and the ``--config.a.b=value`` overrides.

  python -m irnet_jax.main --list-configs
"""
from __future__ import annotations

import ast
import difflib
import importlib
import os
import re
from typing import Any

_DIR = os.path.dirname(os.path.abspath(__file__))


def names() -> list[str]:
  """The packaged recipes' names, sorted."""
  return sorted(f[:-3] for f in os.listdir(_DIR)
                if f.endswith(".py") and not f.startswith("_"))


def _unknown(name: str) -> FileNotFoundError:
  close = difflib.get_close_matches(name, names(), n=1)
  hint = f"did you mean --config={close[0]}? " if close else ""
  # A FileNotFoundError without errno: the CLIs print its message as one line.
  return FileNotFoundError(
      f"no packaged config named {name!r}: {hint}`python -m irnet_jax.main "
      "--list-configs` lists them; a file of your own needs its path (ending in .py).")


def path(name: str) -> str:
  """The file of the packaged recipe ``name``."""
  if name not in names():
    raise _unknown(name)
  return os.path.join(_DIR, name + ".py")


def get_config(name: str) -> Any:
  """``get_config()`` of the packaged recipe ``name`` (a fresh, unlocked config)."""
  path(name)  # An unknown name: the one-line error with the nearest name.
  return importlib.import_module(f"{__name__}.{name}").get_config()


def summary(name: str) -> str:
  """The first sentence of recipe ``name``'s docstring, on one line (read without
  importing the recipe)."""
  with open(path(name), encoding="utf-8") as f:
    doc = ast.get_docstring(ast.parse(f.read())) or ""
  paragraph = " ".join(doc.split("\n\n")[0].split())
  return re.split(r"(?<=\.)\s+(?=[A-Z])", paragraph)[0]


def listing() -> str:
  """What ``--list-configs`` prints: one line per recipe, name and summary."""
  width = max(map(len, names()))
  return "\n".join(f"{n:<{width}}  {summary(n)}" for n in names())


def resolve(arg: str) -> str:
  """A ``--config`` value with a recipe name replaced by its file (``NAME[:ARG]`` ->
  ``/.../irnet_jax/configs/NAME.py[:ARG]``); a path is returned as it is, once it
  exists. Raises FileNotFoundError (one line, with the nearest name) otherwise."""
  spec, sep, rest = arg.partition(":")
  if os.path.isfile(spec):
    return arg
  if spec.endswith(".py") or os.sep in spec or "/" in spec:
    stem = os.path.basename(spec)[:-3] if spec.endswith(".py") else ""
    hint = (f" (the recipes ship in the package: --config={stem})" if stem in names()
            else "")
    raise FileNotFoundError(f"config file {spec} does not exist{hint}.")
  return path(spec) + sep + rest


def define_flag(name: str = "config", help_string: str | None = None,
                **kwargs: Any) -> Any:
  """``config_flags.DEFINE_config_file`` whose value may also be a recipe name (see
  :func:`resolve`). Returns the flag holder."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  if help_string is None:
    help_string = ("Experiment config: a packaged recipe's name (--list-configs lists "
                   "them) or the path of a config file (.py) of your own.")
  holder = config_flags.DEFINE_config_file(name, None, help_string, **kwargs)
  flag = kwargs.get("flag_values", flags.FLAGS)[name]
  flag.parser = _ResolvingParser(flag.parser)
  return holder


class _ResolvingParser:
  """Wraps ml_collections' config file parser: :func:`resolve` first."""

  def __init__(self, parser: Any):
    self._parser = parser

  def parse(self, argument: Any) -> Any:
    return self._parser.parse(resolve(argument) if isinstance(argument, str) else argument)

  def __getattr__(self, attr: str) -> Any:  # flag_type, name, ...
    return getattr(self._parser, attr)
