"""IR-Net ablation on CIFAR-10 ResNet-20 under a short, equal budget.

  python ../shared/data/cifar10_q75.py ~/cifar10_q75.npz      # decode once (~10 s)
  python experiments/cifar10_ablation.py --data=~/cifar10_q75.npz --epochs=4 \\
      --workdir=results/ablation [--seeds=0,1]

Five runs of the official ResNet-20 recipe (SGD 0.1, cosine stepped per epoch, EDE per
epoch, batch 128, weight decay 1e-4, pad-4 crop + flip) with the schedule scaled to
``--epochs``: full precision, IR-Net (Libra-PB + EDE), Libra-PB only (STE backward),
EDE only (plain-sign weights) and the sign + STE baseline. Same seed, data and budget.
Each run is an ordinary training run in ``WORKDIR/<run>_s<seed>`` (so a killed
ablation resumes where it stopped). Writes ``WORKDIR/results.md`` and
``results.json``: test accuracy, wall time and training img/s per run.
"""
from __future__ import annotations

import json
import os

from absl import app, flags

from irnet_jax import config as config_lib
from irnet_jax import train

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "npz with x_train, y_train, x_test, y_test (uint8 NHWC).")
flags.DEFINE_integer("epochs", 4, "Epochs per run (the cosine/EDE schedules scale to it).")
flags.DEFINE_string("workdir", "results/ablation", "Output directory.")
flags.DEFINE_list("seeds", ["0"], "Seeds; every run is repeated for each.")
flags.DEFINE_list("runs", ["fp", "irnet", "libra_pb", "ede", "baseline"], "Which runs.")
flags.DEFINE_string("label", "CIFAR-10 (q75 copy)", "Data label for the table.")
flags.mark_flags_as_required(["data"])

# run -> (weight_bits, act_bits, weight_quantizer, estimator, description)
RUNS = {
    "fp": (32, 32, "none", "ede", "full precision"),
    "irnet": (1, 1, "libra_pb", "ede", "IR-Net (Libra-PB + EDE)"),
    "libra_pb": (1, 1, "libra_pb", "ste", "Libra-PB only (STE backward)"),
    "ede": (1, 1, "sign", "ede", "EDE only (plain-sign weights)"),
    "baseline": (1, 1, "sign", "ste", "baseline (sign + STE)"),
}


def run_config(run: str, seed: int, data: str, epochs: int):
  wb, ab, quantizer, estimator, _ = RUNS[run]
  c = config_lib.base_config()  # The official CIFAR-10 ResNet-20 1w1a recipe.
  c.seed = seed
  c.dataset.name, c.dataset.path = "npz", data
  c.num_epochs = epochs
  c.checkpoint_every_steps = 390  # About one epoch at batch 128.
  c.model.weight_bits, c.model.act_bits = wb, ab
  c.model.weight_quantizer, c.model.estimator = quantizer, estimator
  c.progress_bar = False
  return c


def _train_images_per_sec(workdir: str) -> float:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rates = [r["images_per_sec"] for r in map(json.loads, f) if r["split"] == "train"]
  rates = rates[1:] or rates  # The first interval includes compilation.
  return sum(rates) / max(len(rates), 1)


def main(argv) -> None:
  del argv
  data = os.path.expanduser(FLAGS.data)
  rows = []
  for seed in map(int, FLAGS.seeds):
    for run in FLAGS.runs:
      workdir = os.path.join(FLAGS.workdir, f"{run}_s{seed}")
      final = train.train_and_evaluate(run_config(run, seed, data, FLAGS.epochs), workdir)
      rows.append(dict(run=run, description=RUNS[run][4], seed=seed, epochs=FLAGS.epochs,
                       test_accuracy=final["test_accuracy"],
                       train_seconds=final["train_seconds"],
                       train_images_per_sec=_train_images_per_sec(workdir)))
      print(json.dumps(rows[-1]), flush=True)
  lines = [f"ResNet-20, {FLAGS.label}, {FLAGS.epochs} epochs (cosine recipe scaled), "
           "batch 128, same seed and budget per row.", "",
           "| run | seed | test accuracy | wall time (min) | train img/s |",
           "|---|---|---|---|---|"]
  lines += [f"| {r['description']} | {r['seed']} | {100 * r['test_accuracy']:.2f}% | "
            f"{r['train_seconds'] / 60:.1f} | {r['train_images_per_sec']:.0f} |" for r in rows]
  os.makedirs(FLAGS.workdir, exist_ok=True)
  with open(os.path.join(FLAGS.workdir, "results.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  with open(os.path.join(FLAGS.workdir, "results.json"), "w") as f:
    json.dump(rows, f, indent=2)
  print("\n".join(lines))


if __name__ == "__main__":
  app.run(main)
