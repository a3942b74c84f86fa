"""The one command-line style of every ``python -m irnet_jax.*`` tool.

Each tool defines absl flags (an ml_collections config flag where a config is
involved) and hands its ``main`` to :func:`run`, which adds to absl's ``app.run``:

* ``--help`` (also ``-h``, ``--helpshort``; ``--helpfull``: every library's flags too)
  prints the tool's docstring and flags and exits 0, before any config is loaded;
* ``--debug`` (or ``IRNET_JAX_DEBUG=1``) shows tracebacks; log records below WARNING
  (JAX's, Orbax's) only with absl's ``--verbosity=0``;
* what a user can mistype is one ``error: ...`` line and exit status 1: an unknown
  flag or config field names the nearest valid one (difflib); a bad flag value, a
  missing required flag or a config file that does not load says which. Failures of
  the tool itself are one line through :func:`irnet_jax.workdir.cli_errors`.

Light on purpose (absl; ml_collections and JAX only once a config is involved), so
that ``python -m irnet_jax.report`` stays without JAX.
"""
from __future__ import annotations

import contextlib
import difflib
import logging
import re
import sys
import threading
from typing import Any, Callable, Iterator, NoReturn, Sequence

from absl import app, flags

from irnet_jax import configs
from irnet_jax import workdir as workdir_lib

FLAGS = flags.FLAGS
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
HELPFULL_ARGS = ("--helpfull", "-helpfull")
DEBUG_ARGS = ("--debug", "-debug", "--debug=true", "--debug=1")
_HELP_HINT = "(--help lists the flags)"
_FIELDS_HINT = "(python -m irnet_jax.main --print-config lists every field)"


class ConfigFileError(ValueError):
  """A config file that did not load (its message is the whole story)."""


def run(main: Callable[[Sequence[str]], Any],
        define_flags: Callable[[], None] | None = None) -> NoReturn:
  """``app.run(main)`` with this package's ``--help``, ``--debug`` and one-line errors.

  ``define_flags``: defines the tool's flags, where its errors are the user's (an
  ml_collections config dict flag reads its ``--config.*`` overrides when defined).
  ``main(argv)`` gets only the program name: positional arguments are refused.
  """
  debug = workdir_lib.debug_requested(any(a in DEBUG_ARGS for a in sys.argv[1:]))
  sys.argv[:] = configs.take_free_form_overrides(sys.argv)
  if "debug" not in FLAGS:
    flags.DEFINE_bool("debug", False, "Show the traceback of an error (or "
                      f"{workdir_lib.DEBUG_ENV}=1).", module_name=_main_module_name())
  if define_flags is not None:
    with _user_input(sys.argv, debug):
      define_flags()

  def guarded_main(argv: Sequence[str]) -> Any:
    if not FLAGS["verbosity"].present:  # Libraries' INFO chatter only with --verbosity=0.
      FLAGS.verbosity = -1
    if not debug:
      for handler in logging.getLogger().handlers:
        handler.addFilter(drop_tracebacks)
      threading.excepthook = sys.unraisablehook = _one_line_once
    with workdir_lib.cli_errors(debug):
      try:
        return main(argv)
      except app.UsageError as e:  # absl would print the whole usage text with it.
        if debug:
          raise
        sys.exit(f"error: {e} {_HELP_HINT}")

  app.run(guarded_main, flags_parser=lambda argv: parse_flags(argv, debug))
  raise AssertionError("app.run returned")  # It always exits.


_SEEN_ERRORS: set[str] = set()  # What drop_tracebacks and _one_line_once have printed.


def drop_tracebacks(record: logging.LogRecord) -> bool:
  """A logging filter: a record keeps its message, not its traceback, and a library's
  error repeated for each of its tasks is logged once. Libraries log the exceptions
  they raise (on a full disk Orbax's checkpoint threads log them with tracebacks, and
  asyncio one "Task exception was never retrieved" per array) before the error
  reaches the tool; the tool's ``error:`` line says what to do, and ``--debug`` shows
  every traceback."""
  if record.levelno >= logging.ERROR and not record.name.startswith("irnet_jax"):
    key = f"{record.name}:{str(record.msg)[:40]}"
    if key in _SEEN_ERRORS:
      return False
    _SEEN_ERRORS.add(key)
  if record.exc_info or record.exc_text:
    error = record.exc_info[1] if record.exc_info else None
    record.msg = f"{record.getMessage()}" + (f" ({type(error).__name__}: {error})"
                                             if error is not None else "")
    record.msg, record.args = " ".join(record.msg.split())[:500], None
    record.exc_info, record.exc_text, record.stack_info = None, None, None
  return True


def _one_line_once(info: Any) -> None:
  """``threading.excepthook`` / ``sys.unraisablehook`` without ``--debug`` (not
  ``sys.excepthook``: a bug in the tool keeps its traceback): an exception that escapes
  a library's thread or callback (tensorstore's writers on a full disk print "Event loop
  is closed" a hundred times) is one ``warning:`` line, each distinct message once; the
  tool's own ``error:`` line says what to do. ``info``: the hook's argument (it has
  ``exc_value``)."""
  error = info.exc_value
  text = " ".join(f"{type(error).__name__}: {error}".split())[:300]
  if text not in _SEEN_ERRORS:
    _SEEN_ERRORS.add(text)
    print(f"warning: {text} (in a library's thread; --debug shows the traceback)",
          file=sys.stderr, flush=True)


def parse_flags(argv: list[str], debug: bool = False) -> list[str]:
  """``FLAGS(argv)``; help exits 0, a parsing error is one line (see the module doc)."""
  if any(a in HELP_ARGS + HELPFULL_ARGS for a in argv[1:]):
    _print_help(full=any(a in HELPFULL_ARGS for a in argv[1:]))
  argv = configs.take_free_form_overrides(argv)
  with _user_input(argv, debug):
    rest = FLAGS(argv)
    _check_configs_loaded()
    for name in _config_flag_names():
      configs.apply_free_form_overrides(name, FLAGS[name].value)
  if len(rest) > 1:
    sys.exit(f"error: unexpected arguments {rest[1:]}; every argument is a --flag "
             f"{_HELP_HINT}.")
  return rest


@contextlib.contextmanager
def _user_input(argv: Sequence[str], debug: bool) -> Iterator[None]:
  """Any exception in the block is a mistake in ``argv``: one line and exit status 1
  (with ``debug``: the traceback)."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except  # All of it is user input.
    if debug:
      raise
    sys.exit(flag_error_line(e, argv))


def flag_error_line(e: BaseException, argv: Sequence[str]) -> str:
  """The one ``error: ...`` line for an exception raised while parsing ``argv``."""
  if isinstance(e, flags.UnrecognizedFlagError):
    return _unknown_flag_line(e.flagname)
  if isinstance(e, (KeyError, AttributeError)):  # ml_collections: no such config field.
    line = _unknown_field_line(argv)
    if line is not None:
      return line
  if isinstance(e, flags.Error):
    return f"error: {_one_line(str(e))} {_HELP_HINT}"
  return _one_line(workdir_lib.error_line(e))


def _one_line(text: str) -> str:
  return " ".join(text.split())


def _main_module_name() -> str:
  """The name absl files ``__main__``'s flags under (``--help`` lists those)."""
  return sys.argv[0]


def _print_help(full: bool) -> NoReturn:
  """The tool's docstring and flags on stdout; exit status 0."""
  for name in _config_flag_names():  # Also those defined by a helper (irnet_jax.configs).
    FLAGS.register_key_flag_for_module(_main_module_name(), FLAGS[name])
  main_module = sys.modules["__main__"]
  main_module.__doc__ = plain_text(main_module.__doc__ or "")  # What absl prints first.
  app.usage(shorthelp=not full, writeto_stdout=True)
  sys.exit(0)


def plain_text(doc: str) -> str:
  """A module docstring as a tool's help: reST markup removed (``x`` -> x,
  :func:`~a.b` -> b), and for a library module with a ``CLI::`` section, its first
  line and that section only (the rest documents the Python API)."""
  if "\nCLI::" in doc:
    doc = doc.split("\n", 1)[0] + "\n\n" + doc[doc.index("\nCLI::") + 1:]
  def role(m: re.Match) -> str:  # A reference may be wrapped over two lines.
    name = re.sub(r"\s+", "", m.group(2))
    return name.rsplit(".", 1)[-1] if m.group(1) else name
  doc = re.sub(r":\w+:`(~?)([^`]*)`", role, doc)
  doc = doc.replace("``", "")
  return re.sub(r"::$", ":", doc, flags=re.M)


def _config_flag_names() -> list[str]:
  """The ml_collections config flags among the defined flags."""
  if "ml_collections.config_flags" not in sys.modules:
    return []  # No tool defined one (and report stays light).
  # pylint: disable-next=import-outside-toplevel
  from ml_collections.config_flags.config_flags import is_config_flag
  return [name for name in FLAGS if is_config_flag(FLAGS[name])]


def _check_configs_loaded() -> None:
  """Raises :class:`ConfigFileError` for a config file that did not load (ml_collections
  keeps an OSError of loading until the config is first used, in the middle of a tool)."""
  for name in _config_flag_names():
    value = FLAGS[name].value
    if value is None:
      continue
    try:
      value.keys()  # ml_collections' stand-in for a config that did not load raises.
    except OSError as e:
      cause = str(e.__cause__ or e).strip().splitlines()[-1].strip()
      raise ConfigFileError(f"cannot load --{name}={_config_argument(name)}: "
                            f"{cause}") from e


def _config_argument(name: str) -> str:
  """The file (or recipe) given to config flag ``name``."""
  # pylint: disable-next=import-outside-toplevel
  from ml_collections import config_flags
  try:
    return config_flags.get_config_filename(FLAGS[name])
  except Exception:  # pylint: disable=broad-except  # Not parsed that far.
    return "..."


def _unknown_flag_line(name: str) -> str:
  """``--wrkdir``: the nearest defined flag (difflib)."""
  known = [n for n in FLAGS if len(n) > 1]
  close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
  hint = f"; did you mean --{close[0]}?" if close else ";"
  return f"error: unknown flag --{name}{hint} {_HELP_HINT}"


def _unknown_field_line(argv: Sequence[str]) -> str | None:
  """``--config.optimizer.lerning_rate=...``: the nearest config field (difflib); None
  when every ``--CONFIG.FIELD`` of ``argv`` names a field."""
  # pylint: disable-next=import-outside-toplevel
  from irnet_jax import config as config_lib  # Only now: it imports JAX.
  known, config_names = config_lib.field_names(), _config_flag_names()
  for arg in argv[1:]:
    match = re.match(r"^--?(?:no)?(\w+)\.([\w.]+)(=|$)", arg)
    if match is None or match.group(2) in known:
      continue
    name, field = match.group(1), match.group(2)
    if name in FLAGS and name not in config_names:  # (Undefined: failed as it was defined.)
      continue
    near = config_lib.nearest_field(field, known)
    hint = f"; did you mean --{name}.{near}?" if near else ""
    return f"error: --{name}.{field} is not a config field{hint} {_FIELDS_HINT}."
  return None
