"""The paper's CIFAR-10 row (ResNet-20 1w1a, 86.5%) in one call, on data held on the device.

  python experiments/paper_cifar.py --data=CIFAR.npz --budget_s=600 \\
      --workdir=runs/paper_cifar --out=experiments/results/paper_cifar [--plot=PNG]

The official recipe (the cifar10_resnet20 config: 400 epochs, batch 128, SGD 0.1 with
cosine stepped per epoch, EDE per epoch, pad-4 crop + flip), trained by the launcher
(``irnet_jax.train.train_and_evaluate``) with the data set on the device
(``dataset.cache_on_device``) and ``--steps_per_call`` steps per device call.

Budget: first the run's own jitted call is compiled and timed for a few calls (the
compilation lands in the persistent cache, so the run reuses it); then the run trains
for as many epochs as fit in ``--budget_s`` (at most ``--epochs``), with the cosine and
EDE schedules scaled to that number of epochs, and says so. Output: test accuracy per
epoch on stdout, ``OUT.json`` (per-epoch test accuracy, img/s, the final accuracy) and
a curve PNG; the last stdout line is the JSON summary. ``--cpu`` shrinks it to a test
size (a 512-image subset, 2 epochs) so that the suite runs it.
"""
from __future__ import annotations

import json
import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "npz with x_train, y_train, x_test, y_test (uint8 NHWC).")
flags.DEFINE_float("budget_s", 600.0, "Seconds for the whole call (probe + training).")
flags.DEFINE_integer("epochs", 400, "Epochs of the recipe (the most the budget may give).")
flags.DEFINE_integer("steps_per_call", 390, "Optimizer steps per device call; must divide "
                     "the 390 steps of an epoch (e.g. 26, 39, 78, 130, 195, 390).")
flags.DEFINE_enum("compute_dtype", "float32", ["float32", "bfloat16"],
                  "float32 as in the paper; bfloat16 as an option.")
flags.DEFINE_integer("seed", 0, "Seed of the run.")
flags.DEFINE_string("workdir", None, "Run directory (a finished run there is re-read).")
flags.DEFINE_string("out", None, "Prefix of OUT.json (default WORKDIR/paper_cifar).")
flags.DEFINE_string("plot", None, "PNG of test accuracy per epoch (default OUT.png).")
flags.DEFINE_bool("cpu", False, "Test size: 512 training images, 2 epochs, 4 steps a call.")
flags.DEFINE_integer("probe_calls", 3, "Timed calls of the probe (after one to compile).")
flags.mark_flags_as_required(["data", "workdir"])

PAPER_ACCURACY = 0.865  # Qin et al., CVPR 2020, Table 3: ResNet-20 1w1a on CIFAR-10.


def recipe(data: str, epochs: int):
  """The cifar10_resnet20 recipe on the npz, data on the device, K steps per call."""
  from irnet_jax import config as config_lib  # pylint: disable=import-outside-toplevel
  from irnet_jax import configs  # pylint: disable=import-outside-toplevel
  c = configs.get_config("cifar10_resnet20")
  c.seed, c.num_epochs, c.compute_dtype = FLAGS.seed, epochs, FLAGS.compute_dtype
  c.dataset.name, c.dataset.path, c.dataset.cache_on_device = "npz", data, True
  c.steps_per_call = FLAGS.steps_per_call
  c.progress_bar = False
  steps_per_epoch = config_lib.num_train_steps(c, _num_train(data))[1]
  # Log and evaluate once per epoch; checkpoint every 10 epochs (multiples of K).
  c.log_every_steps = steps_per_epoch
  c.eval_every_steps = -1
  c.checkpoint_every_steps = 10 * steps_per_epoch
  return c


def _num_train(data: str) -> int:
  import numpy as np  # pylint: disable=import-outside-toplevel
  with np.load(data) as z:
    return len(z["y_train"])


def _cpu_subset(data: str, directory: str) -> str:
  """The first 512 training / 256 test images of ``data`` (the ``--cpu`` test size)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  path = os.path.join(directory, "subset.npz")
  with np.load(data) as z:
    np.savez(path, x_train=z["x_train"][:512], y_train=z["y_train"][:512],
             x_test=z["x_test"][:256], y_test=z["y_test"][:256])
  return path


def probe(c) -> dict:
  """Compiles the run's train call and evaluation and times them: seconds per epoch."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from irnet_jax import train  # pylint: disable=import-outside-toplevel
  plan = train.prepare(c, tempfile.mkdtemp(prefix="paper_cifar_probe"))
  start = time.perf_counter()
  setup = train.build(plan.config, plan.devices, plan.steps_per_epoch, plan.total_steps)
  rng = np.random.default_rng(0)
  k, b = c.steps_per_call, c.batch_size
  indices = jax.device_put(rng.integers(0, setup.resident.num_train, (k, b)).astype(np.int32),
                           setup.stacked_sharding)
  state, metrics = setup.train_call(setup.state, setup.resident.train, indices)
  jax.block_until_ready(metrics)
  jax.block_until_ready(setup.eval_all(state[0], setup.resident.test))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(FLAGS.probe_calls):
    state, metrics = setup.train_call(state, setup.resident.train, indices)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / (FLAGS.probe_calls * k)
  start = time.perf_counter()
  jax.block_until_ready(setup.eval_all(state[0], setup.resident.test))
  eval_s = time.perf_counter() - start
  return dict(compile_seconds=compile_s, images_per_sec=b / step_s,
              epoch_seconds=plan.steps_per_epoch * step_s + eval_s,
              steps_per_epoch=plan.steps_per_epoch)


def affordable_epochs(budget_left: float, probed: dict, most: int) -> int:
  """Epochs that fit ``budget_left`` seconds: 10% kept for checkpoints, logging and the
  final evaluation, one compilation paid again when the epoch count changes."""
  usable = 0.9 * budget_left
  epochs = int(usable // probed["epoch_seconds"])
  if epochs < most:  # Another epoch count is another program: compile it again.
    epochs = int((usable - probed["compile_seconds"]) // probed["epoch_seconds"])
  return max(1, min(most, epochs))


def per_epoch(workdir: str, steps_per_epoch: int) -> list[dict]:
  """``[{epoch, test_accuracy, images_per_sec}]`` from the run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  rates = {r["step"]: r.get("images_per_sec") for r in records if r["split"] == "train"}
  return [dict(epoch=r["step"] // steps_per_epoch, test_accuracy=r["accuracy"],
               images_per_sec=rates.get(r["step"]))
          for r in records if r["split"] == "test" and r["step"] % steps_per_epoch == 0]


def plot(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, ax = plt.subplots(figsize=(6.4, 4))
  ax.plot([r["epoch"] for r in rows], [100 * r["test_accuracy"] for r in rows],
          label="IR-Net ResNet-20 1w1a (this library)")
  ax.axhline(100 * PAPER_ACCURACY, color="grey", ls="--", label="paper, 400 epochs (86.5%)")
  ax.set(xlabel="epoch", ylabel="test accuracy (%)", title=title)
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv) -> None:
  del argv
  begin = time.perf_counter()
  import logging  # pylint: disable=import-outside-toplevel
  logging.getLogger().setLevel(logging.WARNING)  # Keep Orbax's INFO lines out.
  import jax  # pylint: disable=import-outside-toplevel
  # The probe's compilation is the run's (same config): keep it for the run.
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(tempfile.gettempdir(), "irnet_paper_cifar_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  from irnet_jax import train  # pylint: disable=import-outside-toplevel
  data, epochs = os.path.expanduser(FLAGS.data), FLAGS.epochs
  if not os.path.isfile(data):
    raise app.UsageError(f"--data={FLAGS.data} does not exist; decode the CIFAR-10 npz "
                         "first (x_train, y_train, x_test, y_test).")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  if FLAGS.cpu:
    data, epochs = _cpu_subset(data, FLAGS.workdir), min(epochs, 2)
    FLAGS.steps_per_call = 4
  c = recipe(data, epochs)
  probed = None
  if not os.path.exists(os.path.join(FLAGS.workdir, "run", "run.json")):
    probed = probe(c)
    print(f"probe: {probed['images_per_sec']:.0f} img/s, {probed['epoch_seconds']:.2f} s "
          f"per epoch with its evaluation, compilation {probed['compile_seconds']:.1f} s",
          flush=True)
    fit = affordable_epochs(FLAGS.budget_s - (time.perf_counter() - begin), probed, epochs)
    if fit < epochs:
      print(f"budget: {FLAGS.budget_s:.0f} s fit {fit} of the recipe's {epochs} epochs; "
            f"the cosine and EDE schedules are scaled to {fit} epochs", flush=True)
      epochs, c = fit, recipe(data, fit)
  else:  # A rerun: the recorded run decides (resumes it, or re-reads a finished one).
    with open(os.path.join(FLAGS.workdir, "run", "run.json")) as f:
      epochs = json.load(f)["fields"]["num_epochs"]
    c = recipe(data, epochs)
  final = train.train_and_evaluate(c, os.path.join(FLAGS.workdir, "run"))
  steps_per_epoch = final["train_steps"] // epochs
  rows = per_epoch(os.path.join(FLAGS.workdir, "run"), steps_per_epoch)
  for r in rows:
    print(f"epoch {r['epoch']:4d}  test accuracy {100 * r['test_accuracy']:.2f}%  "
          f"{r['images_per_sec'] or 0:.0f} img/s", flush=True)
  rates = sorted(r["images_per_sec"] for r in rows[1:] if r["images_per_sec"])
  summary = dict(
      recipe="cifar10_resnet20 (ResNet-20 1w1a, batch 128, cosine per epoch, "
             "EDE per epoch)", data=os.path.basename(FLAGS.data), cpu_test_size=FLAGS.cpu,
      epochs=epochs, recipe_epochs=FLAGS.epochs, scaled=epochs < FLAGS.epochs,
      steps_per_call=c.steps_per_call, compute_dtype=c.compute_dtype, seed=c.seed,
      device=jax.devices()[0].device_kind, backend=jax.default_backend(),
      final_test_accuracy=final["test_accuracy"],
      best_test_accuracy=max((r["test_accuracy"] for r in rows), default=None),
      paper_test_accuracy=PAPER_ACCURACY,
      median_images_per_sec=rates[len(rates) // 2] if rates else None,
      train_seconds=final["train_seconds"], wall_seconds=time.perf_counter() - begin,
      probe=probed, per_epoch=rows, date=time.strftime("%Y-%m-%d"))
  out = FLAGS.out or os.path.join(FLAGS.workdir, "paper_cifar")
  with open(out + ".json", "w") as f:
    json.dump(summary, f, indent=2)
  plot(rows, FLAGS.plot or out + ".png",
       f"CIFAR-10 ResNet-20 1w1a, {epochs} epochs, {summary['device']}")
  print(json.dumps({k: v for k, v in summary.items() if k != "per_epoch"}))


if __name__ == "__main__":
  app.run(main)
