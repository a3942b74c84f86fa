"""The training report (python -m irnet_jax.report): plots and report.md from metrics.jsonl."""
import json

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
