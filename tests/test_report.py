"""The training report (python -m irnet_jax.report): plots and report.md from metrics.jsonl."""
import json
import subprocess
import sys

import pytest

from irnet_jax import report as report_lib


def _write_metrics(path, steps=(100, 200, 300, 400, 500)):
  layer_names = ["layer1.0.conv1", "layer1.0.conv2", "layer10.0.conv1"]
  with open(path, "w") as f:
    for i, step in enumerate(steps):
      f.write(json.dumps({"step": step, "split": "train", "loss": 2.0 / (i + 1),
                          "accuracy": 0.2 + 0.1 * i, "lr": 0.1 * (1 - i / 5),
                          "ede_t": 0.1 * 10 ** i, "ede_k": max(10 / 10 ** i, 1.0),
                          "images_per_sec": 800.0}) + "\n")
      if step % 200 == 0:
        f.write(json.dumps({"step": step, "split": "test", "loss": 1.5 / (i + 1),
                            "accuracy": 0.3 + 0.1 * i}) + "\n")
        rec = {"step": step, "split": "analysis", "weight_entropy_mean": 0.99,
               "flip_ratio_mean": 0.01, "ede_grad_scale_w": 1.0 / (i + 1)}
        for name in layer_names:
          rec[f"weight_entropy/{name}"] = 0.98 + 0.001 * i
          rec[f"flip_ratio/{name}"] = 0.02 / (i + 1)
        f.write(json.dumps(rec) + "\n")
    f.write("not json\n")


def test_report_writes_pngs_and_report(tmp_path):
  run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
  run_a.mkdir()
  run_b.mkdir()
  _write_metrics(run_a / "metrics.jsonl")
  _write_metrics(run_b / "metrics.jsonl", steps=(100, 200, 300))
  (run_a / "final_metrics.json").write_text(json.dumps(
      {"test_accuracy": 0.71, "train_seconds": 12.5}))
  report = report_lib.write_report(run_a, compare=run_b)
  out = run_a / "report"
  for name in ("curves.png", "ede.png", "weight_entropy.png", "flip_ratio.png",
               "compare.png"):
    png = out / name
    assert png.exists() and png.stat().st_size > 1000, name
    assert png.read_bytes()[:4] == b"\x89PNG"
  text = report.read_text()
  assert "test_accuracy" in text and "0.71" in text
  assert "unparsable" in text  # The bad line is reported, not fatal.
  assert "act_entropy" in text  # Missing family reported as skipped.
  assert text.index("layer1.0.conv2") < text.index("layer10.0.conv1")


def test_report_survives_train_only_metrics(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(
      json.dumps({"step": 1, "split": "train", "loss": 1.0}) + "\n")
  report = report_lib.write_report(tmp_path)
  text = report.read_text()
  assert "No 'test' records" in text and "No final_metrics.json" in text
  assert (tmp_path / "report" / "curves.png").exists()


def test_report_files_replace_a_symlink_instead_of_writing_through_it(tmp_path):
  outside = tmp_path / "outside.txt"
  outside.write_text("precious\n")
  run = tmp_path / "run"
  (run / "report").mkdir(parents=True)
  _write_metrics(run / "metrics.jsonl")
  for name in ("report.md", "curves.png"):
    (run / "report" / name).symlink_to(outside)
  report_lib.write_report(run)
  assert outside.read_text() == "precious\n"
  for name in ("report.md", "curves.png"):
    assert not (run / "report" / name).is_symlink()
  assert (run / "report" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_metrics_is_one_clear_error(tmp_path):
  from irnet_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  with pytest.raises(workdir_lib.WorkdirError, match="has no metrics.jsonl"):
    report_lib.write_report(tmp_path)
  with pytest.raises(workdir_lib.WorkdirError, match="not a directory"):
    report_lib.write_report(tmp_path / "nowhere")


# ----------------------------------------------------------------------------------
# Figures a person reads (issue 31).

RESNET20_LAYERS = [f"layer{s}.{b}.conv{c}" for s in (1, 2, 3) for b in (0, 1, 2)
                   for c in (1, 2)]


def _write_readable_run(path, steps=(100, 200, 300, 400, 500, 600)):
  """A run whose per-layer families have 18 layers and whose weight entropy and
  accuracies are nearly constant (0.99990..0.99999: matplotlib would offset them)."""
  path.mkdir(parents=True, exist_ok=True)
  with open(path / "metrics.jsonl", "w") as f:
    for i, step in enumerate(steps):
      near_one = 0.9999 + 0.000018 * i  # 0.99990 .. 0.99999.
      f.write(json.dumps({"step": step, "split": "train", "loss": 2.0 / (i + 1),
                          "accuracy": near_one, "lr": 0.1 * (1 - i / 6),
                          "ede_t": 0.1 * 3 ** i, "ede_k": max(10 / 3 ** i, 1.0),
                          "images_per_sec": 800.0 + i}) + "\n")
      f.write(json.dumps({"step": step, "split": "test", "loss": 1.5 / (i + 1),
                          "accuracy": near_one}) + "\n")
      rec = {"step": step, "split": "analysis", "ede_grad_scale_w": 1.0 / (i + 1)}
      for j, name in enumerate(RESNET20_LAYERS):
        rec[f"weight_entropy/{name}"] = near_one - 1e-6 * j
        rec[f"flip_ratio/{name}"] = (0.02 + 0.001 * j) / (i + 1)
        rec[f"quant_error/{name}"] = 0.6 + 0.001 * j + (0.05 * i if j == 7 else 0.0)
        rec[f"act_entropy/{name}"] = 0.97 - 0.001 * j
      for family in ("weight_entropy", "flip_ratio", "quant_error", "act_entropy"):
        values = [rec[f"{family}/{n}"] for n in RESNET20_LAYERS]
        rec[f"{family}_mean"] = sum(values) / len(values)
      f.write(json.dumps(rec) + "\n")


@pytest.fixture(name="figures")
def _figures(tmp_path, monkeypatch):
  """Runs write_report on two 18-layer runs, with --compare; returns ({file name:
  matplotlib figure as saved}, run_a, run_b)."""
  run_a, run_b = tmp_path / "irnet_seed0", tmp_path / "ste_seed1"
  _write_readable_run(run_a)
  _write_readable_run(run_b, steps=(100, 200, 300, 400))
  saved = {}
  save = report_lib._save  # pylint: disable=protected-access

  def capture(fig, out_dir, name):
    result = save(fig, out_dir, name)  # Draws the figure (savefig) and closes it.
    saved[name] = fig
    return result

  monkeypatch.setattr(report_lib, "_save", capture)
  report_lib.write_report(run_a, compare=run_b)
  return saved, run_a, run_b


def _title_text(fig):
  suptitle = fig._suptitle.get_text() if fig._suptitle is not None else ""  # pylint: disable=protected-access
  return " ".join([suptitle] + [ax.get_title() for ax in fig.axes])


def test_every_figure_names_its_run(figures):
  saved, run_a, run_b = figures
  assert {"curves.png", "ede.png", "weight_entropy.png", "flip_ratio.png",
          "quant_error.png", "act_entropy.png", "compare.png"} <= set(saved)
  for name, fig in saved.items():
    assert run_a.name in _title_text(fig), name
  assert run_b.name in _title_text(saved["compare.png"])


def test_every_axis_has_a_y_label(figures):
  saved, _, _ = figures
  for name, fig in saved.items():
    axes = [ax for ax in fig.axes if ax.axison]
    assert axes, name
    for ax in axes:
      assert ax.get_ylabel().strip(), (name, ax.get_title())


@pytest.mark.parametrize("family", ["weight_entropy", "flip_ratio", "quant_error",
                                    "act_entropy"])
def test_per_layer_plot_is_mean_band_and_a_few_outliers(figures, family):
  import matplotlib.collections  # pylint: disable=import-outside-toplevel
  saved, _, _ = figures
  (ax,) = saved[f"{family}.png"].axes
  lines = [line for line in ax.get_lines() if not line.get_label().startswith("_")]
  means = [line for line in lines if "mean" in line.get_label()]
  assert len(means) == 1 and means[0].get_linewidth() >= 2
  layer_lines = [line for line in lines if line.get_label() in RESNET20_LAYERS]
  assert 1 <= len(layer_lines) <= 3
  assert len(lines) == 1 + len(layer_lines)  # Nothing else: no 18 look-alike lines.
  assert all(line.get_linewidth() < means[0].get_linewidth() for line in layer_lines)
  bands = [c for c in ax.collections if isinstance(c, matplotlib.collections.PolyCollection)
           and not c.get_label().startswith("_")]
  assert len(bands) == 1
  legend = [t.get_text() for t in ax.get_legend().get_texts()]
  assert any("min" in t and "max" in t for t in legend), legend  # The band says what.
  assert {line.get_label() for line in layer_lines} <= set(legend)
  if family == "quant_error":  # Layer 7 drifts away from the others: it is shown.
    assert RESNET20_LAYERS[7] in legend


def test_no_offset_notation_on_any_axis(figures):
  saved, _, _ = figures
  for name, fig in saved.items():
    fig.canvas.draw()
    for ax in fig.axes:
      for axis in (ax.xaxis, ax.yaxis):
        assert axis.get_offset_text().get_text() == "", (name, ax.get_title())
  # The nearly constant series (0.99990..0.99999) is labelled with its digits.
  (ax,) = saved["weight_entropy.png"].axes
  labels = [t.get_text() for t in ax.get_yticklabels()]
  assert any(label.startswith("0.9999") for label in labels), labels


def test_main_prints_every_file_it_wrote(tmp_path, repo_root):
  run_a, run_b = tmp_path / "irnet_seed0", tmp_path / "ste_seed1"
  _write_readable_run(run_a)
  _write_readable_run(run_b)
  proc = subprocess.run([sys.executable, "-m", "irnet_jax.report", f"--workdir={run_a}",
                         f"--compare={run_b}"], cwd=repo_root, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  written = sorted(p for p in (run_a / "report").iterdir())
  assert {p.name for p in written} == {
      "report.md", "curves.png", "ede.png", "weight_entropy.png", "flip_ratio.png",
      "quant_error.png", "act_entropy.png", "compare.png"}
  # One full path per line, nothing else.
  assert sorted(proc.stdout.splitlines()) == sorted(str(p) for p in written), proc.stdout


def test_help_lists_the_files_in_plain_text(repo_root):
  proc = subprocess.run([sys.executable, "-m", "irnet_jax.report", "--help"], cwd=repo_root,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  description, _, flag_help = proc.stdout.partition("flags:")
  for name in ("report.md", "curves.png", "ede.png", "weight_entropy.png", "flip_ratio.png",
               "quant_error.png", "act_entropy.png", "compare.png"):
    assert name in description, name
  assert "compare.png" in flag_help and "report.md" in flag_help  # --compare, --out.
  for markup in ("``", ":func:", ":class:", ":mod:"):
    assert markup not in proc.stdout, markup
