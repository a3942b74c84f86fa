"""IR-Net ablation on CIFAR-10 ResNet-20 under a short, equal budget.

  # CIFAR.npz: x_train, y_train, x_test, y_test (uint8 NHWC), e.g. CIFAR-10 from tfds or
  # torchvision saved with numpy.savez; our figures use a JPEG-q75 copy of CIFAR-10.
  python experiments/cifar10_ablation.py --data=~/cifar10_q75.npz --epochs=4 \\
      --workdir=results/ablation [--seeds=0,1]

Five runs of the official ResNet-20 recipe (SGD 0.1, cosine stepped per epoch, EDE per
epoch, batch 128, weight decay 1e-4, pad-4 crop + flip) with the schedule scaled to
``--epochs``: full precision, IR-Net (Libra-PB + EDE), Libra-PB only (STE backward),
EDE only (plain-sign weights) and the sign + STE baseline. Same seed, data and budget.
Each run is an ordinary training run in ``WORKDIR/<run>_s<seed>`` (so a killed
ablation resumes where it stopped; a finished run is only re-read). Writes
``OUT.md`` and ``OUT.json`` (``--out``, default ``WORKDIR/results``): final and best
test accuracy, wall time and training img/s per run, and in the JSON the per-epoch
test accuracy and train loss read from each run's ``metrics.jsonl``.

Binarization methods (irnet_jax.methods) on the same network and budget: ResNet-20
built full precision and binarized with ``config.model.binarize``:

  python experiments/cifar10_ablation.py --data=~/cifar10_q75.npz --epochs=20 \\
      --runs=method_irnet,method_bnn,method_xnor,method_bireal,method_reactnet \\
      --workdir=runs/methods --out=experiments/results/methods --plot=docs/methods.png

Learning curves (IR-Net against the sign + STE baseline over a longer budget):

  python experiments/cifar10_ablation.py --data=~/cifar10_q75.npz --epochs=20 \\
      --runs=irnet,baseline --workdir=runs/curves \\
      --out=experiments/results/cifar10_curves_20ep --plot=docs/cifar10_curves.png

``--plot`` draws test accuracy per epoch and train loss (per logged interval) for
every run in the table into one PNG. Rerunning the same command after the runs have
finished only re-reads the workdirs, rewrites the tables and redraws the plot;
``--no_train`` does that while runs are still going (partial curves, labelled).
"""
from __future__ import annotations

import json
import os

if __name__ == "__main__":
  # Train as the launcher does: with huge pages where they help (irnet_jax/hugepages.py).
  # Without them XLA:CPU's per-step buffers page-fault afresh each step (~190,000
  # faults/s, a quarter of the CPU in the kernel, on the 2-core machine).
  from irnet_jax import hugepages
  hugepages.reexec(__name__)

from absl import app, flags  # pylint: disable=wrong-import-position

from irnet_jax import config as config_lib
from irnet_jax import data as data_lib
from irnet_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "npz with x_train, y_train, x_test, y_test (uint8 NHWC).")
flags.DEFINE_integer("epochs", 4, "Epochs per run (the cosine/EDE schedules scale to it).")
flags.DEFINE_string("workdir", "results/ablation", "Output directory.")
flags.DEFINE_list("seeds", ["0"], "Seeds; every run is repeated for each.")
flags.DEFINE_list("runs", ["fp", "irnet", "libra_pb", "ede", "baseline"], "Which runs.")
flags.DEFINE_string("label", "CIFAR-10 (q75 copy)", "Data label for the table.")
flags.DEFINE_string("out", None, "Prefix of the result tables OUT.md / OUT.json "
                    "(default WORKDIR/results).")
flags.DEFINE_string("plot", None, "If set, a PNG of test accuracy per epoch and train loss.")
flags.DEFINE_integer("max_steps", -1, "> 0: train every run for this many steps instead (smoke "
                     "tests; the schedules follow it).")
flags.DEFINE_bool("no_train", False, "Train nothing: tabulate and plot what the workdirs "
                  "hold now (runs still going, or stopped, show their epochs so far).")
flags.DEFINE_string("note", "", "Extra sentence for the Markdown table (e.g. machine load).")
flags.mark_flags_as_required(["data"])

# run -> (config.model overrides, description). The ablation rows set IR-Net's parts
# one by one; the method rows build ResNet-20's float twin and binarize it with one
# method of irnet_jax.methods (config.model.binarize), as a user's network would be.
_ABLATION = ("weight_bits", "act_bits", "weight_quantizer", "estimator")
RUNS = {
    "fp": (dict(zip(_ABLATION, (32, 32, "none", "ede"))), "full precision"),
    "irnet": (dict(zip(_ABLATION, (1, 1, "libra_pb", "ede"))), "IR-Net (Libra-PB + EDE)"),
    "libra_pb": (dict(zip(_ABLATION, (1, 1, "libra_pb", "ste"))),
                 "Libra-PB only (STE backward)"),
    "ede": (dict(zip(_ABLATION, (1, 1, "sign", "ede"))), "EDE only (plain-sign weights)"),
    "baseline": (dict(zip(_ABLATION, (1, 1, "sign", "ste"))), "baseline (sign + STE)"),
    **{f"method_{m}": (dict(binarize=m), f"binarize_model(method={m!r})")
       for m in ("irnet", "bnn", "xnor", "bireal", "reactnet")},
}


def run_config(run: str, seed: int, data: str, epochs: int, max_steps: int = -1):
  model, _ = RUNS[run]
  c = config_lib.base_config()  # The official CIFAR-10 ResNet-20 1w1a recipe.
  c.seed = seed
  c.dataset.name, c.dataset.path = "npz", data
  c.num_epochs = epochs
  c.checkpoint_every_steps = 390  # About one epoch at batch 128.
  c.model.update(model)
  c.progress_bar = False
  if max_steps > 0:
    c.num_train_steps = max_steps
  return c


def _records(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _train_images_per_sec(records: list[dict]) -> float:
  rates = [r["images_per_sec"] for r in records
           if r["split"] == "train" and "images_per_sec" in r]
  rates = rates[1:] or rates  # The first interval includes compilation.
  return sum(rates) / max(len(rates), 1)


def curves(records: list[dict], steps_per_epoch: int) -> dict:
  """Per-epoch curves of one run's ``metrics.jsonl`` records.

  Returns lists: ``epoch`` (completed epochs, float: the last eval of a run cut by
  ``--max_steps`` may fall mid-epoch), ``test_accuracy`` (fraction) at each eval;
  ``train_epoch`` / ``train_loss``: every logged train interval (mean loss over it).
  """
  test = [r for r in records if r["split"] == "test"]
  train = [r for r in records if r["split"] == "train"]
  return dict(epoch=[r["step"] / steps_per_epoch for r in test],
              test_accuracy=[r["accuracy"] for r in test],
              train_epoch=[r["step"] / steps_per_epoch for r in train],
              train_loss=[r["loss"] for r in train])


def _finished(workdir: str, c) -> dict | None:
  """``final_metrics.json`` of a finished run of ``c`` in ``workdir``, else None."""
  path = os.path.join(workdir, "final_metrics.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    final = json.load(f)
  total, _ = config_lib.num_train_steps(c, data_lib.dataset_info(c.dataset).num_train)
  return final if final.get("train_steps") == total and final.get("seed") == c.seed else None


def plot(rows: list[dict], path: str, title: str) -> None:
  """Test accuracy per epoch (left) and train loss (right) of every row, one PNG."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
  for r in rows:
    label = f"{r['description']}, seed {r['seed']}"
    if not r["finished"]:
      label += f" ({r['epochs_completed']:.3g} of {r['epochs']} epochs so far)"
    acc.plot(r["curves"]["epoch"], [100 * a for a in r["curves"]["test_accuracy"]],
             marker="o", markersize=3, label=label)
    loss.plot(r["curves"]["train_epoch"], r["curves"]["train_loss"], label=label)
  acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
  loss.set(xlabel="epoch", ylabel="cross-entropy", title="train loss (per logged interval)")
  for ax, where in ((acc, "lower right"), (loss, "upper right")):
    ax.set_xlim(0, max(r["epochs"] for r in rows))  # The whole budget, even if unfinished.
    ax.grid(alpha=0.3)
    ax.legend(loc=where)
  if not all(r["finished"] for r in rows):
    title += " -- unfinished runs, curves so far"
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _row(run: str, seed: int, workdir: str, c, final: dict | None) -> dict:
  """One table row; ``final`` None: an unfinished run, read from its metrics.jsonl."""
  _, steps_per_epoch = config_lib.num_train_steps(
      c, data_lib.dataset_info(c.dataset).num_train)
  records = _records(workdir) if os.path.exists(os.path.join(workdir, "metrics.jsonl")) else []
  curve = curves(records, steps_per_epoch)
  accs = curve["test_accuracy"] + ([final["test_accuracy"]] if final else [])
  return dict(run=run, description=RUNS[run][1], seed=seed, epochs=FLAGS.epochs,
              finished=final is not None,
              epochs_completed=(final["train_steps"] if final else
                                max([r["step"] for r in records if r["split"] == "test"],
                                    default=0)) / steps_per_epoch,
              test_accuracy=accs[-1] if accs else None,
              best_test_accuracy=max(accs, default=None),
              train_seconds=final["train_seconds"] if final else None,
              train_images_per_sec=_train_images_per_sec(records) if records else None,
              curves=curve)


def _table(rows: list[dict], title: str) -> list[str]:
  pct = lambda v: "-" if v is None else f"{100 * v:.2f}%"
  lines = [f"{title}, same seed and budget per row. {FLAGS.note}".rstrip(), "",
           "| run | seed | epochs done | last test accuracy | best test accuracy "
           "| wall time (min) | train img/s |", "|---|---|---|---|---|---|---|"]
  for r in rows:
    minutes = "-" if r["train_seconds"] is None else f"{r['train_seconds'] / 60:.1f}"
    rate = "-" if r["train_images_per_sec"] is None else f"{r['train_images_per_sec']:.0f}"
    lines.append(f"| {r['description']} | {r['seed']} | "
                 f"{r['epochs_completed']:.3g} / {r['epochs']} | {pct(r['test_accuracy'])} | "
                 f"{pct(r['best_test_accuracy'])} | {minutes} | {rate} |")
  if not all(r["finished"] for r in rows):
    lines += ["", "Unfinished runs (epochs done < budget) show their latest evaluation; "
              "wall time is known only when a run ends."]
  return lines


def main(argv) -> None:
  del argv
  data = os.path.expanduser(FLAGS.data)
  rows = []
  for seed in map(int, FLAGS.seeds):
    for run in FLAGS.runs:
      workdir = os.path.join(FLAGS.workdir, f"{run}_s{seed}")
      c = run_config(run, seed, data, FLAGS.epochs, FLAGS.max_steps)
      final = _finished(workdir, c)
      if final is None and not FLAGS.no_train:
        final = train.train_and_evaluate(c, workdir)
      rows.append(_row(run, seed, workdir, c, final))
      print(json.dumps({k: v for k, v in rows[-1].items() if k != "curves"}), flush=True)
  title = (f"ResNet-20, {FLAGS.label}, {FLAGS.epochs} epochs (cosine recipe scaled), "
           "batch 128")
  lines = _table(rows, title)
  out = FLAGS.out or os.path.join(FLAGS.workdir, "results")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out + ".md", "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(out + ".json", "w") as f:
    json.dump(rows, f, indent=2)
  if FLAGS.plot:
    plot(rows, FLAGS.plot, title)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
