"""Two processes through jax.distributed (gloo on loopback) == one process, two devices."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OVERRIDES = ["--config.num_train_steps=4", "--config.batch_size=16",
             "--config.eval_batch_size=120", "--config.log_every_steps=1",
             "--config.checkpoint_every_steps=2", "--config.progress_bar=False",
             "--config.dataset.num_threads=0"]


def _env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  return env


def _launch(workdir, devices, extra=()):
  cmd = [sys.executable, "-m", "irnet_jax.main", "--config=quickstart",
         f"--workdir={workdir}", *OVERRIDES, *extra]
  return subprocess.Popen(cmd, cwd=REPO, env=_env(devices), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _train_losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["loss"] for r in map(json.loads, f) if r["split"] == "train"]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  multi = tmp_path / "two_processes"
  procs = [_launch(multi, 1, [f"--coordinator_address=127.0.0.1:{port}",
                              "--num_processes=2", f"--process_id={i}"]) for i in range(2)]
  # Alongside the pair: start-up and compilation are most of each launch.
  procs.append(_launch(tmp_path / "one_process", 2))
  outputs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-3000:]
  np.testing.assert_allclose(_train_losses(multi), _train_losses(tmp_path / "one_process"),
                             rtol=1e-5)
  a = json.load(open(multi / "final_metrics.json"))
  b = json.load(open(tmp_path / "one_process" / "final_metrics.json"))
  assert a["test_examples"] == b["test_examples"] == 360
  assert a["test_accuracy"] == b["test_accuracy"]
  assert os.listdir(multi / "checkpoints")  # Orbax wrote through both processes.
  # TensorBoard: the quickstart's scalars at metrics.jsonl's steps, from process 0 only
  # (one event file per split, not one per process).
  from tensorboard.backend.event_processing import plugin_event_multiplexer
  from tensorboard.util import tensor_util
  events = plugin_event_multiplexer.EventMultiplexer()
  events.AddRunsFromDirectory(str(multi / "tensorboard"))
  events.Reload()
  records = [r for r in map(json.loads, open(multi / "metrics.jsonl"))]
  for split, tag in (("train", "loss"), ("train", "lr"), ("train", "ede_t"),
                     ("test", "accuracy")):
    want = {r["step"]: r[tag] for r in records if r["split"] == split}
    got = {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
           for e in events.Tensors(split, tag)}
    assert want and got.keys() == want.keys(), (split, tag)
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-6)
  for split in ("train", "test"):
    assert len(os.listdir(multi / "tensorboard" / split)) == 1
