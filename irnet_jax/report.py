"""Plots and a Markdown report from a training run's metrics.jsonl.

    python -m irnet_jax.report --workdir=DIR [--compare=DIR2] [--out=DIR/report] [--debug]

Reads DIR/metrics.jsonl (one JSON object per line, each with "step" and "split";
written by the training loop) and, if present, DIR/final_metrics.json. Writes these
files into DIR/report/ (or --out) and prints the full path of each one it wrote:

  report.md             tables of final/best and per-layer values, and the figures
  curves.png            loss, accuracy, learning rate and images/s against step
  ede.png               EDE t and k; EDE gradient scale of weights and activations
  weight_entropy.png    per-layer metrics over training, one figure each: the mean
  flip_ratio.png        over layers (bold line), the min-max band over layers, and
  quant_error.png       the (up to 3) layers farthest from the mean at the last
  act_entropy.png       step, by name
  ede_grad_scale_a.png
  compare.png           with --compare: both runs' main curves on the same axes

Every figure's title names the run (the workdir's basename; both for compare.png).
Splits: "train" (loss, accuracy, lr, ede_t, ede_k, images_per_sec), "test" (loss,
accuracy) and "analysis" (the keys of irnet_jax.diagnostics.measure, "name/<layer>"
per layer). A figure whose values are missing is not written, and report.md says
why; unparsable lines are skipped and counted. Only matplotlib (Agg) is needed.
"""
from __future__ import annotations

import io
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

from irnet_jax import workdir as workdir_lib

Records = dict[str, list[dict[str, Any]]]

# Per-layer metric families of the "analysis" split:
# prefix -> (title, y label, key of the mean over layers).
LAYER_FAMILIES = {
    "weight_entropy": ("Weight entropy per layer", "entropy of weight signs (bits)",
                       "weight_entropy_mean"),
    "flip_ratio": ("Weight sign flip ratio per layer (since previous analysis)",
                   "fraction of signs flipped", "flip_ratio_mean"),
    "quant_error": ("Weight quantization error per layer", "relative L2 error",
                    "quant_error_mean"),
    "act_entropy": ("Activation entropy per layer", "entropy of input signs (bits)",
                    "act_entropy_mean"),
    "ede_grad_scale_a": ("EDE gradient scale of activations per layer",
                         "mean |dEDE/dx| (gradient factor)", "ede_grad_scale_a"),
}
# How many layers a per-layer figure names (those farthest from the mean at the end).
OUTLIER_LAYERS = 3


def load_metrics(path: str | os.PathLike) -> tuple[Records, int]:
  """``metrics.jsonl`` -> ({split: [record, ...] sorted by step}, #skipped lines).

  Lines that are blank, not JSON objects, or lack a numeric ``step`` are skipped.
  """
  records: Records = {}
  skipped = 0
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError:
        skipped += 1
        continue
      if not isinstance(rec, dict) or not isinstance(rec.get("step"), (int, float)):
        skipped += 1
        continue
      records.setdefault(str(rec.get("split", "train")), []).append(rec)
  for recs in records.values():
    recs.sort(key=lambda r: r["step"])
  return records, skipped


def series(records: Records, split: str, key: str) -> tuple[list[float], list[float]]:
  """(steps, values) of ``key`` in ``split``; non-numeric values are dropped."""
  xs, ys = [], []
  for rec in records.get(split, []):
    v = rec.get(key)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      xs.append(rec["step"])
      ys.append(float(v))
  return xs, ys


def _natural_key(name: str) -> list:
  # "layer10" after "layer2"; digits compare as numbers.
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def layer_names(records: Records, family: str) -> list[str]:
  """Layers that have ``family/<layer>`` in the analysis split, in network order."""
  prefix = family + "/"
  names = {k[len(prefix):] for rec in records.get("analysis", []) for k in rec
           if k.startswith(prefix)}
  return sorted(names, key=_natural_key)


def _last(records: Records, split: str, key: str) -> float | None:
  _, ys = series(records, split, key)
  return ys[-1] if ys else None


# ----------------------------------------------------------------------------------
# Figures. Each returns the file name written, or None if there was nothing to plot.


def _plt():
  import sys

  import matplotlib
  # Headless (Agg) unless pyplot was already set up, e.g. inline in a notebook,
  # whose backend we must not switch.
  if "matplotlib.pyplot" not in sys.modules:
    matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def _plot(ax, xs, ys, **kw) -> None:
  # Markers for sparse series, so that a run with one or two points still shows.
  if len(xs) < 30:
    kw.setdefault("marker", "o")
    kw.setdefault("ms", 3)
  ax.plot(xs, ys, **kw)


def _title(run: str | None, what: str) -> str:
  return f"{run}: {what}" if run else what


def _step_label(x: float, _pos=None) -> str:
  """A step for a tick label: 2500 -> "2.5k", 156000 -> "156k", 2e6 -> "2M"."""
  for div, unit in ((1e6, "M"), (1e3, "k")):
    if abs(x) >= div:
      return f"{x / div:.4g}{unit}"
  return f"{x:.4g}"


def _panel(ax, title: str, lines: Sequence[tuple[str, tuple[list, list]]], ylabel: str,
           legend: dict | None = None, log: bool = False) -> None:
  """One axes: ``(label, (steps, values))`` lines (empty ones skipped) against step;
  a log y axis if ``log`` and every value is positive; a legend if ``legend``
  (its keyword arguments) is not None."""
  for label, (xs, ys) in lines:
    if xs:
      _plot(ax, xs, ys, label=label)
  if log and all(y > 0 for _, (_, ys) in lines for y in ys):
    ax.set_yscale("log")
    ylabel += " (log scale)"
  ax.set_title(title)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if legend is not None:
    ax.legend(**legend)


def _plain_ticks(fig) -> None:
  """Tick labels that are the values themselves: no offset ("1e-5+9.999e-1") and no
  "1e-5" multiplier above an axis, which a reader misses (log axes keep 10^k); steps
  as 2.5k, 20k, 156k, which stay short."""
  # pylint: disable-next=import-outside-toplevel
  from matplotlib.ticker import FuncFormatter, MaxNLocator, ScalarFormatter
  for ax in fig.axes:
    if ax.get_xlabel() == "step":
      ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
      ax.xaxis.set_major_formatter(FuncFormatter(_step_label))
    for axis in (ax.xaxis, ax.yaxis):
      formatter = axis.get_major_formatter()
      if isinstance(formatter, ScalarFormatter):
        formatter.set_useOffset(False)
        formatter.set_scientific(False)


def _save(fig, out_dir: Path, name: str) -> str:
  _plain_ticks(fig)
  fig.tight_layout()
  png = io.BytesIO()
  fig.savefig(png, format="png", dpi=110)
  _plt().close(fig)
  # Atomic, and a symlink placed at the file's path is replaced, not written through.
  workdir_lib.write_atomic(str(out_dir / name), png.getvalue())
  return name


def plot_curves(records: Records, out_dir: Path, run: str | None = None) -> str | None:
  """Loss, accuracy (train and test), learning rate and images/s vs step; ``run``
  (the run's name) goes into the title."""
  panels = [("Loss", "cross-entropy (nats)", [("train", "loss"), ("test", "loss")]),
            ("Accuracy", "accuracy (fraction correct)",
             [("train", "accuracy"), ("test", "accuracy")]),
            ("Learning rate", "learning rate", [("train", "lr")]),
            ("Throughput", "images/s", [("train", "images_per_sec")])]
  panels = [p for p in panels if any(series(records, s, k)[0] for s, k in p[2])]
  if not panels:
    return None
  plt = _plt()
  fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
  for ax, (title, ylabel, lines) in zip(axes[0], panels):
    _panel(ax, title, [(split, series(records, split, key)) for split, key in lines], ylabel,
           legend={} if len(lines) > 1 else None)
  fig.suptitle(_title(run, "Training curves"))
  return _save(fig, out_dir, "curves.png")


def plot_ede(records: Records, out_dir: Path, run: str | None = None) -> str | None:
  """EDE t and k (log scale) and the EDE gradient scale of weights/activations."""
  t, k = series(records, "train", "ede_t"), series(records, "train", "ede_k")
  gw = series(records, "analysis", "ede_grad_scale_w")
  ga = series(records, "analysis", "ede_grad_scale_a")
  panels = []
  if t[0] or k[0]:
    panels.append(("EDE parameters", [("t", t), ("k", k)], "t, k", True))
  if gw[0] or ga[0]:
    panels.append(("EDE gradient scale (mean over layers)",
                   [("weights", gw), ("activations", ga)], "mean |dEDE/dx| (gradient factor)",
                   False))
  if not panels:
    return None
  plt = _plt()
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
  for ax, (title, lines, ylabel, log) in zip(axes[0], panels):
    _panel(ax, title, lines, ylabel, legend={}, log=log)
  fig.suptitle(_title(run, "Error Decay Estimator"))
  return _save(fig, out_dir, "ede.png")


def layer_spread(records: Records, family: str) -> tuple[list, list, list, list]:
  """(steps, mean, min, max) over the layers of ``family/<layer>`` at each analysis step
  that has any."""
  prefix = family + "/"
  steps, mean, lo, hi = [], [], [], []
  for rec in records.get("analysis", []):
    values = [float(v) for k, v in rec.items() if k.startswith(prefix)
              and isinstance(v, (int, float)) and not isinstance(v, bool)]
    if values:
      steps.append(rec["step"])
      mean.append(sum(values) / len(values))
      lo.append(min(values))
      hi.append(max(values))
  return steps, mean, lo, hi


def outlier_layers(records: Records, family: str, n: int = OUTLIER_LAYERS) -> list[str]:
  """The (up to) ``n`` layers of ``family`` farthest from the mean over layers at their
  last logged step, farthest first; layers on the mean are not outliers."""
  steps, mean, _, _ = layer_spread(records, family)
  mean_at = dict(zip(steps, mean))
  distance = {}
  for name in layer_names(records, family):
    xs, ys = series(records, "analysis", f"{family}/{name}")
    if xs:
      m = mean_at[xs[-1]]
      d = abs(ys[-1] - m)
      if d > 1e-12 + 1e-9 * abs(m):
        distance[name] = d
  return sorted(distance, key=lambda name: -distance[name])[:n]


def plot_layer_family(records: Records, family: str, out_dir: Path,
                      run: str | None = None) -> str | None:
  """``family/<layer>`` over training: the mean over layers (bold), the min-max band
  over layers, and the layers farthest from the mean at the end (thin, named)."""
  names = layer_names(records, family)
  if not names:
    return None
  plt = _plt()
  title, ylabel, _ = LAYER_FAMILIES.get(family, (family, family, f"{family}_mean"))
  fig, ax = plt.subplots(figsize=(9.5, 4.2))
  steps, mean, lo, hi = layer_spread(records, family)
  n = len(names)
  layers = f"{n} layer" + ("s" if n > 1 else "")
  band = ax.fill_between(steps, lo, hi, color="0.6", alpha=0.3, lw=0,
                         label=f"min-max of {layers}")
  _plot(ax, steps, mean, color="black", lw=2.5, label=f"mean of {layers}", zorder=3)
  handles = [ax.get_lines()[-1], band]
  outliers = outlier_layers(records, family)
  if outliers:
    from matplotlib.patches import Patch  # pylint: disable=import-outside-toplevel
    # A legend row without a symbol, heading the named layers.
    handles.append(Patch(visible=False, label="farthest from the mean\nat the last step:"))
  for i, name in enumerate(outliers):
    xs, ys = series(records, "analysis", f"{family}/{name}")
    _plot(ax, xs, ys, color=f"C{i + 1}", lw=1.2, ms=2.5, label=name, zorder=2)
    handles.append(ax.get_lines()[-1])
  ax.set_title(_title(run, title))
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
  return _save(fig, out_dir, f"{family}.png")


# (split, key, panel title, y label).
COMPARE_PANELS = [
    ("test", "accuracy", "Test accuracy", "accuracy (fraction correct)"),
    ("train", "loss", "Train loss", "cross-entropy (nats)"),
    ("train", "accuracy", "Train accuracy", "accuracy (fraction correct)"),
    ("test", "loss", "Test loss", "cross-entropy (nats)"),
    ("analysis", "weight_entropy_mean", "Mean weight entropy", "entropy (bits)"),
    ("analysis", "flip_ratio_mean", "Mean flip ratio", "fraction of signs flipped"),
    ("analysis", "act_entropy_mean", "Mean activation entropy", "entropy (bits)"),
    ("train", "lr", "Learning rate", "learning rate")]


def plot_compare(runs: Sequence[tuple[str, Records]], out_dir: Path) -> str | None:
  """The main curves of several ``(name, records)`` runs, one panel per metric, runs
  overlaid; the title names the runs."""
  panels = [p for p in COMPARE_PANELS
            if any(series(r, p[0], p[1])[0] for _, r in runs)]
  if not panels:
    return None
  plt = _plt()
  cols = min(4, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows + 0.4), squeeze=False)
  for ax, (split, key, title, ylabel) in zip(axes.ravel(), panels):
    _panel(ax, title, [(label, series(recs, split, key)) for label, recs in runs], ylabel,
           legend={"fontsize": 7})
  for ax in axes.ravel()[len(panels):]:
    ax.axis("off")
  fig.suptitle(" vs ".join(name for name, _ in runs))
  return _save(fig, out_dir, "compare.png")


# ----------------------------------------------------------------------------------
# Report.


def _fmt(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def headline(records: Records) -> dict[str, Any]:
  """Key numbers of a run: final/best test accuracy, final losses, EDE, entropy."""
  out: dict[str, Any] = {}
  xs, ys = series(records, "test", "accuracy")
  if ys:
    best = max(range(len(ys)), key=ys.__getitem__)
    out["final test accuracy"] = ys[-1]
    out["best test accuracy (step)"] = f"{ys[best]:.4g} ({xs[best]})"
  for split, key, label in [("test", "loss", "final test loss"),
                            ("train", "loss", "final train loss"),
                            ("train", "accuracy", "final train accuracy"),
                            ("train", "ede_t", "final EDE t"), ("train", "ede_k", "final EDE k"),
                            ("analysis", "weight_entropy_mean", "final mean weight entropy"),
                            ("analysis", "flip_ratio_mean", "final mean flip ratio"),
                            ("analysis", "act_entropy_mean", "final mean activation entropy")]:
    v = _last(records, split, key)
    if v is not None:
      out[label] = v
  _, ips = series(records, "train", "images_per_sec")
  if ips:
    out["mean images/s"] = sum(ips) / len(ips)
  steps = [r["step"] for recs in records.values() for r in recs]
  if steps:
    out["last step"] = max(steps)
  return out


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
  return lines


def _layer_table(records: Records) -> list[str]:
  """Last analysis values per layer, one column per family that is present."""
  families = [f for f in LAYER_FAMILIES if layer_names(records, f)]
  if not families:
    return []
  names = sorted({n for f in families for n in layer_names(records, f)}, key=_natural_key)
  rows = [[n] + [_last(records, "analysis", f"{f}/{n}") for f in families] for n in names]
  return _table(["layer"] + families, rows)


def _read_final(workdir: Path, name: str = "final_metrics.json") -> dict[str, Any] | None:
  path = workdir / name
  if not path.exists():
    return None
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, OSError):
    return None
  return workdir_lib.flatten(data) if isinstance(data, dict) else None


def write_report(workdir: str | os.PathLike, compare: str | os.PathLike | None = None,
            out_dir: str | os.PathLike | None = None) -> Path:
  """Writes the plots and ``report.md`` for ``workdir`` (and ``compare``); returns the
  report path. Raises :class:`irnet_jax.workdir.WorkdirError` if ``workdir`` does not
  exist or ``workdir/metrics.jsonl`` is missing, unless the workdir has results without
  a training log (``eval_metrics.json`` of ``python -m irnet_jax.evaluate``, e.g. on a
  workdir of ``irnet_jax.convert``)."""
  return write_report_files(workdir, compare, out_dir)[-1]


def write_report_files(workdir: str | os.PathLike, compare: str | os.PathLike | None = None,
                       out_dir: str | os.PathLike | None = None) -> list[Path]:
  """:func:`write_report`, returning the path of every file it wrote: the figures in
  the order written, then ``report.md``."""
  workdir = Path(workdir)
  if not workdir.is_dir():
    raise workdir_lib.WorkdirError(f"--workdir={workdir} is not a directory; give the "
                                   "--workdir of a training run.")
  evaluated = _read_final(workdir, "eval_metrics.json")
  notes: list[str] = []
  metrics = workdir / workdir_lib.METRICS_FILE
  if evaluated is not None and not metrics.exists():
    records, skipped = {}, 0
    notes.append("No metrics.jsonl (no training in this workdir).")
  elif not metrics.exists():
    raise workdir_lib.WorkdirError(
        f"{workdir} has no {workdir_lib.METRICS_FILE} (the training log); give the --workdir "
        "of a training run (it is written from the first logged step), or run python -m "
        "irnet_jax.evaluate on this workdir first for a report of its evaluation.")
  else:
    records, skipped = load_metrics(metrics)
  workdir_lib.require_extra("plots", "python -m irnet_jax.report")  # Before any folder.
  out = Path(out_dir) if out_dir is not None else workdir / "report"
  out.mkdir(parents=True, exist_ok=True)
  if skipped:
    notes.append(f"{skipped} unparsable line(s) of metrics.jsonl were skipped.")
  for split in ("train", "test", "analysis"):
    if split not in records:
      notes.append(f"No '{split}' records in metrics.jsonl.")

  figures: list[tuple[str, str]] = []
  run = workdir.name

  def add(title: str, name: str | None, why_missing: str) -> None:
    if name:
      figures.append((title, name))
    else:
      notes.append(f"Skipped '{title}': {why_missing}.")

  add("Training curves", plot_curves(records, out, run), "no loss/accuracy/lr values")
  add("Error Decay Estimator", plot_ede(records, out, run),
      "no ede_t/ede_k (train) or ede_grad_scale_* (analysis) values")
  for family, (title, _, _) in LAYER_FAMILIES.items():
    add(title, plot_layer_family(records, family, out, run),
        f"no '{family}/<layer>' keys in the analysis split")

  lines = [f"# Training report: `{workdir.name}`", "", f"Run directory: `{workdir}`", ""]
  final = _read_final(workdir)
  head = headline(records)
  other_head = other_final = None
  other_label = None
  if compare is not None:
    compare = Path(compare)
    other_label = compare.name
    try:
      other, other_skipped = load_metrics(compare / "metrics.jsonl")
    except FileNotFoundError:
      notes.append(f"--compare: {compare / 'metrics.jsonl'} not found; no comparison.")
    else:
      if other_skipped:
        notes.append(f"{other_skipped} unparsable line(s) skipped in {compare.name}.")
      other_head, other_final = headline(other), _read_final(compare)
      label_a = workdir.name
      if label_a == other_label:  # Same basename: fall back to full paths.
        label_a, other_label = str(workdir), str(compare)
      add(f"Comparison with {other_label}",
          plot_compare([(label_a, records), (other_label, other)], out),
          "neither run has the compared metrics")

  lines += ["## Summary", ""]
  if other_head is not None:
    keys = list(dict.fromkeys([*head, *other_head]))
    lines += _table(["metric", workdir.name, other_label],
                    [[k, head.get(k), other_head.get(k)] for k in keys])
  elif head:
    lines += _table(["metric", "value"], list(head.items()))
  else:
    lines.append("No metrics to summarize.")
  lines.append("")

  if final is not None or other_final is not None:
    lines += ["## final_metrics.json", ""]
    if other_head is not None:
      a, b = final or {}, other_final or {}
      keys = list(dict.fromkeys([*a, *b]))
      lines += _table(["key", workdir.name, other_label], [[k, a.get(k), b.get(k)] for k in keys])
    else:
      lines += _table(["key", "value"], list(final.items()))
    lines.append("")
  else:
    notes.append("No final_metrics.json in the run directory.")

  if evaluated is not None:
    lines += ["## eval_metrics.json (python -m irnet_jax.evaluate)", "",
              *_table(["key", "value"], list(evaluated.items())), ""]

  layer_lines = _layer_table(records)
  if layer_lines:
    lines += ["## Per-layer analysis (last logged values)", "", *layer_lines, ""]

  lines += ["## Figures", ""]
  for title, name in figures:
    lines += [f"### {title}", "", f"![{title}]({name})", ""]
  if notes:
    lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
  report = out / "report.md"
  workdir_lib.write_atomic(str(report), "\n".join(lines))
  return [out / name for _, name in figures] + [report]


def define_flags() -> None:
  # pylint: disable-next=import-outside-toplevel
  from absl import flags  # Imported here: only the command line needs absl.
  flags.DEFINE_string("workdir", None, "Run directory containing metrics.jsonl.")
  flags.DEFINE_string("compare", None, "Optional second run directory to compare with: "
                      "adds compare.png (both runs on the same axes) and its column to "
                      "report.md's tables.")
  files = ", ".join(["report.md", "curves.png", "ede.png",
                     *[f"{family}.png" for family in LAYER_FAMILIES]])
  flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/report). report "
                      f"writes {files} and, with --compare, compare.png there (a figure "
                      "without values is left out, and report.md says why), and prints "
                      "the path of each.")
  flags.mark_flag_as_required("workdir")


def main(argv: Sequence[str]) -> None:
  """Writes the report of ``--workdir`` and prints the full path of every file written,
  one per line."""
  del argv  # cli.run refuses positional arguments.
  # pylint: disable-next=import-outside-toplevel
  from absl import flags
  f = flags.FLAGS
  for path in write_report_files(f.workdir, f.compare, f.out):
    print(os.path.abspath(path))


if __name__ == "__main__":
  from irnet_jax import cli  # pylint: disable=ungrouped-imports

  cli.run(main, define_flags)


__all__ = ["write_report", "write_report_files", "load_metrics", "series", "layer_names",
           "layer_spread", "outlier_layers", "headline", "plot_curves", "plot_ede",
           "plot_layer_family", "plot_compare"]
