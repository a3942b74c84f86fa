"""python -m irnet_jax.evaluate: a workdir's newest checkpoint on its (or another) dataset,
on any host (the backend is resolved here), and after a damaged checkpoint was repaired."""
import glob
import json
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from irnet_jax import checkpointing, evaluate, kernels, run_record, steps, train


def _config(tiny_config, npz):
  """4 steps, checkpoints at 2 and 4, of a 12-class model on 4-class data (top-5)."""
  return tiny_config(npz, num_train_steps=4, eval_every_steps=4,
                     **{"model.num_classes": 12})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, make_npz, tiny_config):
  """A finished run of :func:`_config`: (workdir, final metrics, its directory)."""
  tmp = tmp_path_factory.mktemp("eval")
  npz = make_npz(tmp / "toy.npz")
  workdir = str(tmp / "run")
  final = train.train_and_evaluate(_config(tiny_config, npz), workdir)
  return workdir, final, tmp


def test_cli_reproduces_the_runs_final_evaluation(trained, repo_root):
  workdir, final, _ = trained
  out = subprocess.run([sys.executable, "-m", "irnet_jax.evaluate", f"--workdir={workdir}"],
                       cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.load(open(os.path.join(workdir, "eval_metrics.json")))
  assert f"test_accuracy={got['test_accuracy']:.4f}" in out.stdout
  assert got["step"] == 4 and got["test_examples"] == final["test_examples"] == 21
  assert got["test_accuracy"] == final["test_accuracy"]
  np.testing.assert_allclose(got["test_loss"], final["test_loss"], rtol=1e-6)
  assert "test_top5_accuracy" in got  # 12 classes.


def test_a_workdir_it_cannot_write_still_gets_the_result(trained, tmp_path, repo_root):
  workdir, final, _ = trained
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  os.remove(copy / "eval_metrics.json") if os.path.exists(copy / "eval_metrics.json") else None
  os.mkdir(copy / "eval_metrics.json")  # In the way, like a read-only directory (as root).
  out = subprocess.run([sys.executable, "-m", "irnet_jax.evaluate", f"--workdir={copy}"],
                       cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  assert f"test_accuracy={final['test_accuracy']:.4f}" in out.stdout and "step=4" in out.stdout
  errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "eval_metrics.json" in errors[0], out.stderr[-3000:]
  assert "Traceback" not in out.stderr


def test_other_dataset_and_top5_match_the_model(trained, make_npz):
  workdir, _, tmp = trained
  other = make_npz(tmp / "other.npz", n_test=13, seed=5)
  c = run_record.load_config(workdir)
  c.dataset.path = other
  got = evaluate.evaluate_workdir(workdir, c)
  model, _ = checkpointing.load_model(workdir)
  with np.load(other) as f:
    x, y = f["x_test"], f["y_test"]
  logits = np.asarray(model(jnp.asarray(
      (x / 255.0 - np.asarray(c.dataset.mean)) / np.asarray(c.dataset.std), jnp.float32)))
  top5 = np.argsort(-logits, axis=-1)[:, :5]
  assert got["test_examples"] == 13
  assert got["test_accuracy"] == np.mean(logits.argmax(-1) == y)
  assert got["test_top5_accuracy"] == np.mean(np.any(top5 == y[:, None], axis=-1))
  np.testing.assert_allclose(
      got["test_loss"], float(steps.cross_entropy(jnp.asarray(logits), y).mean()), rtol=1e-5)
  assert got["dataset"]["path"] == other


def test_cli_overrides_apply_to_the_workdirs_config(trained, make_npz, repo_root):
  workdir, _, tmp = trained
  other = make_npz(tmp / "other_cli.npz", n_test=13, seed=5)
  out = subprocess.run([sys.executable, "-m", "irnet_jax.evaluate", f"--workdir={workdir}",
                        f"--config.dataset.path={other}", "--config.eval_batch_size=4"],
                       cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.load(open(os.path.join(workdir, "eval_metrics.json")))
  assert got["dataset"]["path"] == other and got["test_examples"] == 13
  assert got["model"] == run_record.load_config(workdir).model.name  # The rest kept.


def test_clear_errors(trained, tmp_path):
  workdir, _, tmp = trained
  with pytest.raises(ValueError, match="no config.json"):
    evaluate.evaluate_workdir(str(tmp_path))
  c = run_record.load_config(workdir)
  c.model.name = "vgg_small"  # Another model than the checkpoint's.
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="shapes differ|entries"):
    evaluate.evaluate_workdir(workdir, c)


def _copy(trained, tmp_path):
  workdir, final, tmp = trained
  copy = str(tmp_path / "run")
  shutil.copytree(workdir, copy)
  return copy, final, tmp


def test_a_workdir_trained_with_the_cpu_kernels_evaluates_without_them(trained, tmp_path,
                                                                        monkeypatch):
  # config.json records the training host's backend; this host cannot run it (the
  # kernels are off, and 4 devices): evaluate picks its own instead of failing.
  workdir, final, _ = _copy(trained, tmp_path)
  path = os.path.join(workdir, "config.json")
  recorded = json.load(open(path))
  recorded["model"]["conv_impl"] = "avx512"
  json.dump(recorded, open(path, "w"))
  monkeypatch.setenv(kernels.KERNELS_ENV, "0")
  got = evaluate.evaluate_workdir(workdir)
  assert got["step"] == 4 and got["test_accuracy"] == final["test_accuracy"]
  np.testing.assert_allclose(got["test_loss"], final["test_loss"], rtol=1e-6)
  with pytest.raises(ValueError, match="cannot run here"):  # Asked for: refused, not swapped.
    evaluate.evaluate_workdir(workdir, conv_impl="avx512")


def test_damaged_newest_checkpoint_is_trained_again_and_evaluated(trained, tmp_path,
                                                                   tiny_config):
  # Issue 19 acceptance: damage the newest checkpoint of a finished run and rerun it;
  # training resumes from the previous one and saves the newest step again (it used to
  # stay at the previous one for ever), and evaluate reads it with the parameters of
  # the undamaged run.
  workdir, final, tmp = _copy(trained, tmp_path)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  for f in glob.glob(os.path.join(ckpt_dir, "4", "**", "*"), recursive=True):
    if os.path.isfile(f):
      open(f, "wb").write(b"garbage")
  again = train.train_and_evaluate(_config(tiny_config, str(tmp / "toy.npz")), workdir)
  got = evaluate.evaluate_workdir(workdir)
  assert got["step"] == 4 and got["test_accuracy"] == final["test_accuracy"]
  assert again["params_fingerprint"] == final["params_fingerprint"]
  assert checkpointing.Checkpointer(ckpt_dir).all_steps() == [2, 4]
  assert [d.split("-")[0] for d in os.listdir(os.path.join(ckpt_dir, ".damaged"))] == ["4"]
  model, _ = checkpointing.load_model(workdir)
  assert train.params_fingerprint(nnx.state(model)) == final["params_fingerprint"]
