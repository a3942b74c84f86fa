"""irnet-jax: train, evaluate, convert, export, report on and summarize binary networks.

  irnet-jax train --config=quickstart --workdir=DIR     python -m irnet_jax.main ...
  irnet-jax evaluate --workdir=DIR                      python -m irnet_jax.evaluate ...
  irnet-jax convert --torch=FILE --workdir=DIR          python -m irnet_jax.convert ...
  irnet-jax export --workdir=DIR --out=FILE             python -m irnet_jax.export ...
  irnet-jax report --workdir=DIR                        python -m irnet_jax.report ...
  irnet-jax summary --config=NAME                       python -m irnet_jax.summary ...

`python -m irnet_jax COMMAND ...` is the same without the installed script.
`irnet-jax COMMAND --help` lists the command's flags.
"""
from __future__ import annotations

import difflib
import runpy
import sys
from typing import Sequence

# Command -> the module that is the tool (each also runs as `python -m MODULE`).
COMMANDS = {
    "train": "irnet_jax.main",
    "evaluate": "irnet_jax.evaluate",
    "convert": "irnet_jax.convert",
    "export": "irnet_jax.export",
    "report": "irnet_jax.report",
    "summary": "irnet_jax.summary",
}


def main(argv: Sequence[str] | None = None) -> None:
  """Runs ``COMMAND``'s tool as ``python -m MODULE`` would, with the remaining arguments."""
  args = list(sys.argv[1:] if argv is None else argv)
  if not args or args[0] in ("-h", "--help", "help"):
    print(__doc__.strip())
    sys.exit(0 if args else 1)
  command = args[0]
  if command not in COMMANDS:
    near = difflib.get_close_matches(command, list(COMMANDS), n=1)
    sys.exit(f"error: unknown command {command!r}" + (f"; did you mean {near[0]}?" if near
                                                       else "")
             + f" Commands: {', '.join(COMMANDS)} (irnet-jax --help).")
  sys.argv = [sys.argv[0], *args[1:]]
  # The tool's own __main__ block, as `python -m` runs it (argv[0] becomes its file).
  runpy.run_module(COMMANDS[command], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
