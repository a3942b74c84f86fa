"""The experiment scripts run end to end (tiny settings), so they do not rot."""
import glob
import json
import os
import signal
import subprocess

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_cifar(path, num_train, num_test):
  """A CIFAR-shaped npz of random uint8 images and 10 classes; returns ``path``."""
  rng = np.random.default_rng(0)
  np.savez(path, x_train=rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8),
           y_train=rng.integers(0, 10, num_train),
           x_test=rng.integers(0, 256, (num_test, 32, 32, 3), dtype=np.uint8),
           y_test=rng.integers(0, 10, num_test))
  return path


@pytest.mark.slow
def test_gpu_check_cpu_mode_prints_every_figure(tmp_path):
  data = _random_cifar(tmp_path / "tiny.npz", 256, 50)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # One device, as a user.
  env.update(PYTHONPATH=REPO, TMPDIR=str(tmp_path), JAX_PLATFORMS="cpu",
             GPU_CHECK_STEPS="1", GPU_CHECK_WARMUP="1", GPU_CHECK_R20_BATCH="8",
             GPU_CHECK_R18_BATCH="2", GPU_CHECK_R18_SIZE="32", GPU_CHECK_TRAIN_STEPS="4",
             GPU_CHECK_DTYPES="bfloat16")  # float32 is the 1-epoch run's compute.
  # ~2 minutes on 2 idle cores (6 processes, each compiling its steps).
  proc = subprocess.Popen(["bash", "experiments/gpu_check.sh", "--cpu", f"--data={data}"],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  try:
    stdout, stderr = proc.communicate(timeout=1800)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)  # The script and every step it started.
    raise
  assert proc.returncode == 0, stderr[-3000:]
  out = json.loads(stdout.strip().splitlines()[-1])
  assert out["mode"] == "cpu" and out["failed"] == []
  assert out["devices"]["backend"] == "cpu"
  for name, bits, batch in [("resnet20", "1w1a", 8), ("resnet20_fp", "32w32a", 8),
                            ("resnet18", "1w1a", 2), ("resnet18_fp", "32w32a", 2)]:
    bench = out[f"throughput_{name}_bfloat16"]
    assert bench["config"] == name.removesuffix("_fp") and bench["bits"] == bits
    assert (bench["batch"], bench["image_size"], bench["compute_dtype"]) == (
        batch, 32, "bfloat16")
    assert bench["train_images_per_sec"] > 0 and bench["eval_images_per_sec"] > 0
  run = out["cifar10_resnet20_1epoch"]
  assert run["train_steps"] == 4 and 0 <= run["test_accuracy"] <= 1
  assert run["train_images_per_sec"] > 0 and np.isfinite(run["test_loss"])


def test_gpu_check_rejects_missing_data(tmp_path):
  proc = subprocess.run(["bash", "experiments/gpu_check.sh", "--cpu",
                         f"--data={tmp_path}/none.npz"], cwd=REPO, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2
  assert "--data=CIFAR.npz is required and must exist" in proc.stderr
  assert "x_train, y_train, x_test, y_test" in proc.stderr


@pytest.mark.slow
def test_gpu_check_paper_cifar_cpu_mode_ends_in_a_json_line(tmp_path):
  data = _random_cifar(tmp_path / "tiny.npz", 600, 300)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # One device, as a user.
  env.update(PYTHONPATH=REPO, TMPDIR=str(tmp_path), JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", "experiments/gpu_check.sh", "--cpu", "--paper_cifar",
                         f"--data={data}", "--budget_s=600"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  out = json.loads(lines[-1])
  # The --cpu size: 512 training images = 4 steps an epoch, 2 epochs, 4 steps a call.
  assert out["epochs"] == 2 and out["steps_per_call"] == 4 and out["cpu_test_size"]
  assert 0 <= out["final_test_accuracy"] <= 1 and out["backend"] == "cpu"
  assert out["probe"]["images_per_sec"] > 0 and out["probe"]["steps_per_epoch"] == 4
  assert [line.split()[1] for line in lines if line.startswith("epoch")] == ["1", "2"]
  result = glob.glob(str(tmp_path / "gpu_check.*" / "paper_cifar" / "paper_cifar.json"))
  assert result and len(json.load(open(result[0]))["per_epoch"]) == 2
