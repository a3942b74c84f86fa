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
import importlib.util
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


def load(spec: str) -> Any:
  """The config ``--config=spec`` gives: a recipe name, a config file (``PATH[:ARG]``,
  its ``get_config(ARG)``), or "" for :func:`irnet_jax.config.base_config`."""
  if not spec:
    from irnet_jax import config as config_lib  # pylint: disable=import-outside-toplevel
    return config_lib.base_config()
  file, _, arg = resolve(spec).partition(":")
  module_spec = importlib.util.spec_from_file_location("_irnet_jax_config", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


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


# Free-form config sections: their keys are the user's (a factory's own arguments), so
# ml_collections, which reads ``--config.a.b=v`` overrides of existing fields only (when
# the flag is defined), cannot take them; they are set after parsing.
FREE_FORM = ("model.kwargs",)
_FREE_FORM_ARG = re.compile(r"^--(\w+)\.((?:" + "|".join(map(re.escape, FREE_FORM))
                            + r")\.\w+)=(.*)$")
_pending: list[tuple[str, str, str]] = []  # (config flag, "model.kwargs.NAME", VALUE)


def take_free_form_overrides(argv: list[str]) -> list[str]:
  """``argv`` without its ``--CONFIG.model.kwargs.NAME=VALUE`` arguments, which are kept
  for :func:`apply_free_form_overrides` (call before the config flag is defined)."""
  rest = []
  for arg in argv:
    match = _FREE_FORM_ARG.match(arg)
    if match:
      _pending.append(match.groups())
    else:
      rest.append(arg)
  return rest


def apply_free_form_overrides(name: str, config: Any) -> None:
  """Sets the kept overrides of config flag ``name`` on ``config``: each VALUE read as
  a Python literal (``16``, ``0.5``, ``True``, ``(1, 2)``), else as the string."""
  for flag, path, text in [p for p in _pending if p[0] == name]:
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, key = path.split(".")
    section = config
    for parent in parents:
      section = section[parent]
    with section.unlocked():
      section[key] = value
    _pending.remove((flag, path, text))


def define_flag(name: str = "config", help_string: str | None = None,
                **kwargs: Any) -> Any:
  """``config_flags.DEFINE_config_file`` whose value may also be a recipe name (see
  :func:`resolve`), with the free-form ``--config.model.kwargs.NAME=VALUE`` overrides
  (:func:`take_free_form_overrides`). Returns the flag holder."""
  import sys  # pylint: disable=import-outside-toplevel

  from absl import flags  # pylint: disable=import-outside-toplevel
  from ml_collections import config_flags  # pylint: disable=import-outside-toplevel

  sys.argv[:] = take_free_form_overrides(sys.argv)
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
