"""python -m irnet_jax.evaluate: a workdir's newest checkpoint on its (or another) dataset."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from irnet_jax import checkpointing, evaluate, train
from test_train import REPO, make_npz, tiny_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished 2-step run of a 12-class model on 4-class data (so top-5 is reported)."""
  tmp = tmp_path_factory.mktemp("eval")
  npz = make_npz(tmp / "toy.npz")
  workdir = str(tmp / "run")
  final = train.train_and_evaluate(
      tiny_config(npz, num_train_steps=2, **{"model.num_classes": 12}), workdir)
  return workdir, final, tmp


def test_cli_reproduces_the_runs_final_evaluation(trained):
  workdir, final, _ = trained
  out = subprocess.run([sys.executable, "-m", "irnet_jax.evaluate", f"--workdir={workdir}"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  got = json.load(open(os.path.join(workdir, "eval_metrics.json")))
  assert f"test_accuracy={got['test_accuracy']:.4f}" in out.stdout
  assert got["step"] == 2 and got["test_examples"] == final["test_examples"] == 21
  assert got["test_accuracy"] == final["test_accuracy"]
  np.testing.assert_allclose(got["test_loss"], final["test_loss"], rtol=1e-6)
  assert "test_top5_accuracy" in got  # 12 classes.


def test_other_dataset_and_top5_match_the_model(trained):
  workdir, _, tmp = trained
  other = make_npz(tmp / "other.npz", n_test=13, seed=5)
  c = checkpointing.load_config(workdir)
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
      got["test_loss"], float(train.cross_entropy(jnp.asarray(logits), y).mean()), rtol=1e-5)
  assert got["dataset"]["path"] == other


def test_clear_errors(trained, tmp_path):
  workdir, _, tmp = trained
  with pytest.raises(ValueError, match="no config.json"):
    evaluate.evaluate_workdir(str(tmp_path))
  c = checkpointing.load_config(workdir)
  c.model.name = "vgg_small"  # Another model than the checkpoint's.
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="shapes differ|entries"):
    evaluate.evaluate_workdir(workdir, c)
