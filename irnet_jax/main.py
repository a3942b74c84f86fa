"""Experiment launcher.

  python -m irnet_jax.main --config=NAME --workdir=DIR [--config.a.b=value ...] [--debug]
  python -m irnet_jax.main --config=my_config.py --workdir=DIR ...
  python -m irnet_jax.main --list-configs
  python -m irnet_jax.main --print-config [--config=NAME]

``--config`` names a packaged recipe (``irnet_jax/configs/``; ``--list-configs`` prints
them with their one-line descriptions) or the path of a config file of your own.
``--print-config`` lists every ``--config.FIELD`` with its value and meaning.

Errors a user can fix are one ``error: ...`` line and exit status 1 (``--debug`` or
``IRNET_JAX_DEBUG=1``: the traceback); a run stopped by SIGTERM or Ctrl-C exits with
75 after checkpointing (the same command resumes it).

Multi-host: add ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``
on every process (``jax.distributed.initialize``; on CPU, gloo collectives), or
``--distributed`` where JAX finds them in the environment (Cloud TPU VMs, SLURM, Open
MPI; docs/launch.md).
"""
from __future__ import annotations

import logging
import sys
from typing import Sequence

if __name__ == "__main__":
  if {"--list-configs", "--list_configs"} & set(sys.argv[1:]):
    from irnet_jax import configs
    print(configs.listing())
    sys.exit(0)
  if {"--print-config", "--print_config"} & set(sys.argv[1:]):
    from irnet_jax import config as config_lib
    from irnet_jax import configs, workdir
    with workdir.cli_errors():
      print(config_lib.describe(configs.load(next(
          (a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--config=")), ""))))
    sys.exit(0)
  # Before the heavy imports: the [train] extra, then maybe re-execute with huge
  # pages (see hugepages.py).
  from irnet_jax import hugepages, workdir
  workdir.run_tool_needing("train", "python -m irnet_jax.main")
  hugepages.reexec(__name__)

import jax  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from irnet_jax import cli, configs, preemption, train  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
configs.define_flag("config")
flags.DEFINE_string("workdir", None, "Output directory (checkpoints, metrics).")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0 (multi-host).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.DEFINE_bool("list_configs", False, "Print the packaged recipes (--config=NAME) with "
                  "their one-line descriptions, and exit (also --list-configs).")
flags.DEFINE_bool("print_config", False, "Print every field of --config (or of the "
                  "defaults) as --config.FIELD=VALUE with its meaning, and exit (also "
                  "--print-config).")
flags.DEFINE_bool("distributed", False, "Multi-host from the environment: "
                  "jax.distributed.initialize() with no arguments (Cloud TPU VMs, SLURM "
                  "srun, Open MPI), which finds the coordinator and process ids itself.")
flags.mark_flags_as_required(["config", "workdir"])


def init_distributed() -> None:
  """``jax.distributed.initialize`` when the multi-host flags or ``--distributed`` are
  given."""
  given = [FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id]
  if all(v is None for v in given) and not FLAGS.distributed:
    return
  if any(v is None for v in given) and not all(v is None for v in given):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id must be "
                         "given together (or none of them, with --distributed).")
  # Collectives between processes on CPU devices need gloo (the default is none); the
  # setting only concerns CPU devices, so it is harmless on GPU/TPU hosts.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(v is None for v in given):  # --distributed: JAX reads the cluster's environment.
    jax.distributed.initialize()
  else:
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


def main(argv: Sequence[str]) -> None:
  """Trains ``--config`` in ``--workdir`` and prints the final test metrics.

  Expected failures (a refused (re)start, a bad config, data or workdir, a full disk,
  a diverged run) are one ``error: ...`` line (:func:`irnet_jax.cli.run`).
  """
  del argv  # cli.run refuses positional arguments.
  # Our progress goes to the bar and metrics.jsonl; keep Orbax's INFO chatter out.
  logging.getLogger().setLevel(logging.WARNING)
  logging.getLogger("irnet_jax").setLevel(logging.INFO)
  init_distributed()
  try:
    final = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except preemption.Preempted as e:
    print(f"preempted: {e}", file=sys.stderr, flush=True)
    sys.exit(preemption.EXIT_CODE)
  if jax.process_index() == 0:
    print(f"test_accuracy={final['test_accuracy']:.4f} test_loss={final['test_loss']:.4f} "
          f"train_seconds={final['train_seconds']:.1f} workdir={FLAGS.workdir}")


if __name__ == "__main__":
  cli.run(main)
