"""irnet_jax.train: the loop on 1 and 4 devices, resume, fallbacks, NaN."""
import glob
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from irnet_jax import checkpointing, kernels, run_record, train
from irnet_jax import config as config_lib


@pytest.mark.parametrize("override,message", [
    ({"model.name": "resnet50"}, "model.name"),
    ({"batch_size": 10}, "multiple of the 4 devices"),
    ({"ede.t_min": 10.0}, "t_min < t_max"),
    ({"optimizer.learning_rate": 0.0}, "learning_rate"),
    ({"num_epochs": 0}, "num_epochs"),
    ({"dataset.path": ""}, "dataset.path"),
])
def test_bad_config_fails_before_compiling(toy_npz, tmp_path, override, message, tiny_config):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(toy_npz, **override), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.parametrize("override", [{"seed": -1}, {"keep_checkpoints": 0},
                                      {"ede.t_max": float("inf")}])
def test_bad_values_are_refused_before_the_workdir_is_made(tmp_path, override, toy_npz,
                                                          tiny_config):
  # seed=-1 used to pass validation and fail after run.json was written.
  with pytest.raises(config_lib.ConfigError):
    train.train_and_evaluate(tiny_config(toy_npz, **override), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_missing_npz_file_is_a_clear_error(tmp_path, tiny_config):
  with pytest.raises(ValueError, match="does not exist|not found|No such"):
    train.train_and_evaluate(tiny_config(str(tmp_path / "nope.npz")), str(tmp_path / "w"))


def test_one_and_four_devices_same_loss(toy_npz, tmp_path, tiny_config, read_metrics):
  one = train.train_and_evaluate(tiny_config(toy_npz, num_devices=1), str(tmp_path / "one"))
  four = train.train_and_evaluate(tiny_config(toy_npz, num_devices=4), str(tmp_path / "four"))
  l1 = [r["loss"] for r in read_metrics(tmp_path / "one", "train")]
  l4 = [r["loss"] for r in read_metrics(tmp_path / "four", "train")]
  assert len(l1) == len(l4) == 6
  np.testing.assert_allclose(l1, l4, rtol=2e-4, atol=2e-5)
  assert one["test_examples"] == four["test_examples"] == 21  # every image, padded batch
  np.testing.assert_allclose(one["test_loss"], four["test_loss"], rtol=1e-3)
  final = json.load(open(tmp_path / "four" / "final_metrics.json"))
  assert {"test_accuracy", "test_loss", "train_steps", "train_seconds",
          "params_fingerprint"} <= final.keys()
  # The resolved convolution backend is recorded (config.json, final metrics).
  for run, result, devices in (("one", one, 1), ("four", four, 4)):
    recorded = json.load(open(tmp_path / run / "config.json"))["model"]["conv_impl"]
    assert recorded == result["conv_impl"] == kernels.resolve("auto", jax.devices()[:devices])
  assert four["conv_impl"] == "xla_cpu"
  rec = read_metrics(tmp_path / "four", "train")[-1]
  assert {"step", "loss", "accuracy", "lr", "ede_t", "ede_k", "images_per_sec"} <= rec.keys()


def test_cpu_kernels_only_on_a_single_device_mesh(toy_npz, tiny_config):
  # On a multi-device mesh the opaque kernels would run on the gathered batch on every
  # device: "auto" resolves to XLA's (partitioned) convolutions there.
  c = tiny_config(toy_npz)
  c.model.num_classes = 4
  batch = {"image": np.zeros((16, 8, 8, 3), np.float32), "label": np.zeros(16, np.int32)}
  for n in (1, 4):
    setup = train.build(c, jax.devices()[:n], 10, 60)
    assert setup.conv_impl == kernels.resolve("auto", jax.devices()[:n])
    hlo = setup.train_step.lower(setup.state, batch).as_text()
    assert ("irnet_binary_conv_fwd" in hlo) == (setup.conv_impl == "avx512"), n
  assert setup.conv_impl == "xla_cpu"


def test_loss_decreases_on_learnable_set(toy_npz, tmp_path, tiny_config, read_metrics):
  c = tiny_config(toy_npz, num_train_steps=40, checkpoint_every_steps=40, eval_every_steps=40,
                  log_every_steps=10, analysis_every_steps=20, **{"optimizer.schedule": "constant",
                                         "optimizer.learning_rate": 0.05})
  final = train.train_and_evaluate(c, str(tmp_path))
  losses = [r["loss"] for r in read_metrics(tmp_path, "train")]
  assert losses[-1] < 0.6 * losses[0], losses
  # 4 classes (chance 0.25). Train-mode accuracy: after 40 small steps the BN running
  # statistics that eval uses are still settling, so test accuracy is not asserted.
  assert read_metrics(tmp_path, "train")[-1]["accuracy"] > 0.6
  assert final["test_examples"] == 21
  diag = read_metrics(tmp_path, "analysis")
  assert [r["step"] for r in diag] == [20, 40]
  assert 0.9 < diag[-1]["weight_entropy_mean"] <= 1.0  # Libra-PB keeps signs balanced
  assert "flip_ratio_mean" in diag[-1] and "act_entropy/layer1.0.conv1" in diag[-1]


class _Kill(Exception):
  pass


def _kill_at(step):
  def hook(done):
    if done == step:
      raise _Kill()
  return hook


def test_kill_and_resume_is_bit_identical(toy_npz, tmp_path, tiny_config, read_metrics):
  ref = train.train_and_evaluate(tiny_config(toy_npz), str(tmp_path / "ref"))
  with pytest.raises(_Kill):
    train.train_and_evaluate(tiny_config(toy_npz), str(tmp_path / "run"), step_hook=_kill_at(3))
  assert checkpointing.Checkpointer(str(tmp_path / "run" / "checkpoints")).all_steps() == [2]
  resumed = train.train_and_evaluate(tiny_config(toy_npz), str(tmp_path / "run"))
  assert resumed["params_fingerprint"] == ref["params_fingerprint"]
  assert resumed["test_loss"] == ref["test_loss"]
  # The log of the resumed run is that of one run: each step once, same losses.
  steps = [r["step"] for r in read_metrics(tmp_path / "run", "train")]
  assert steps == list(range(1, 7))
  np.testing.assert_allclose([r["loss"] for r in read_metrics(tmp_path / "run", "train")],
                             [r["loss"] for r in read_metrics(tmp_path / "ref", "train")])


def test_corrupt_newest_checkpoint_falls_back(toy_npz, tmp_path, caplog, tiny_config):
  train.train_and_evaluate(tiny_config(toy_npz, num_train_steps=4), str(tmp_path))
  ckpt_dir = tmp_path / "checkpoints"
  assert checkpointing.Checkpointer(str(ckpt_dir)).all_steps() == [2, 4]
  for f in glob.glob(str(ckpt_dir / "4" / "model" / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  model, config = checkpointing.load_model(str(tmp_path))
  assert "unreadable" in caplog.text and "falling back" in caplog.text
  ref_model, _ = checkpointing.load_model(str(tmp_path), step=2)
  assert train.params_fingerprint(nnx.state(model)) == \
      train.params_fingerprint(nnx.state(ref_model))
  assert config.model.num_classes == 4


def test_nan_stops_cleanly_and_keeps_last_good_checkpoint(toy_npz, tmp_path, tiny_config):
  # lr 1e15: step 1 is still finite (and checkpointed), step 2 overflows.
  c = tiny_config(toy_npz, num_train_steps=8, checkpoint_every_steps=1,
                  **{"optimizer.learning_rate": 1e15, "optimizer.schedule": "constant"})
  with pytest.raises(FloatingPointError, match="last good checkpoint") as err:
    train.train_and_evaluate(c, str(tmp_path))
  steps = checkpointing.Checkpointer(str(tmp_path / "checkpoints")).all_steps()
  message = str(err.value)
  assert steps and f"checkpoint, step {steps[-1]}," in message, (steps, message)
  assert "at step 2" in message and "learning_rate" in message and "t_max" in message
  model, _ = checkpointing.load_model(str(tmp_path))  # the kept one is finite
  leaves = jax.tree.leaves(nnx.state(model))
  assert all(np.all(np.isfinite(np.asarray(leaf))) for leaf in leaves)
  assert not os.path.exists(tmp_path / "final_metrics.json")


def _hash_tree(root):
  """{relative path: sha256} of every file under ``root`` but the workdir lock (which
  records the pid of the last launch, refused or not)."""
  import hashlib
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      if name.startswith(".lock"):
        continue
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
  return out


def _config_file(tmp_path, c):
  """A config file (like irnet_jax/configs/*.py) returning ``c``, for the launcher."""
  path = tmp_path / "tiny_config.py"
  path.write_text("import json\nimport ml_collections\n\n\ndef get_config():\n"
                  f"  return ml_collections.ConfigDict(json.loads({c.to_json()!r}))\n")
  return str(path)


def test_restart_with_another_config_is_refused_and_leaves_workdir_identical(
    toy_npz, tmp_path, tiny_config, read_metrics, repo_root):
  workdir = tmp_path / "run"
  c = tiny_config(toy_npz, num_train_steps=4)
  ref = train.train_and_evaluate(c, str(workdir))
  before = _hash_tree(workdir)
  assert {"config.json", "run.json", "metrics.jsonl", "final_metrics.json"} <= before.keys()
  # The launcher, as a user would run it: non-zero exit, each field named with the fix.
  cmd = [sys.executable, "-m", "irnet_jax.main", f"--config={_config_file(tmp_path, c)}",
         f"--workdir={workdir}", "--config.model.name=resnet18_cifar"]
  out = subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=300)
  assert out.returncode != 0
  assert "model.name: 'resnet20' (recorded) vs 'resnet18_cifar' (now)" in out.stderr
  assert "--workdir" in out.stderr and "--config.model.name=resnet20" in out.stderr
  assert "Traceback" not in out.stderr
  assert _hash_tree(workdir) == before
  # In process: every differing field is named; nothing is touched either.
  other = tiny_config(toy_npz, num_train_steps=4, seed=1, **{"optimizer.learning_rate": 0.2})
  with pytest.raises(run_record.RunMismatchError) as e:
    train.train_and_evaluate(other, str(workdir))
  assert "seed: 0 (recorded) vs 1" in str(e.value)
  assert "optimizer.learning_rate: 0.1 (recorded) vs 0.2" in str(e.value)
  assert _hash_tree(workdir) == before
  # Fields on the resumable list may change: the finished run is resumed, not redone.
  again = train.train_and_evaluate(
      tiny_config(toy_npz, num_train_steps=4, log_every_steps=3, eval_every_steps=2,
                  checkpoint_every_steps=1, num_devices=2, eval_batch_size=4), str(workdir))
  assert again["params_fingerprint"] == ref["params_fingerprint"]
  assert [r["step"] for r in read_metrics(workdir, "train")] == [1, 2, 3, 4]


def test_incompatible_checkpoint_is_an_error_not_unreadable(toy_npz, tmp_path, tiny_config):
  # A workdir without run.json/config.json (e.g. written by an older version): the
  # checkpoints themselves refuse another model instead of being skipped as damaged.
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(toy_npz, num_train_steps=2), str(workdir))
  os.remove(workdir / "run.json")
  os.remove(workdir / "config.json")
  before = _hash_tree(workdir)
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r"checkpoint 2 .*does not belong to this run.*shapes differ"):
    train.train_and_evaluate(tiny_config(toy_npz, num_train_steps=2,
                                         **{"model.name": "resnet18_cifar"}), str(workdir))
  assert _hash_tree(workdir) == before


def test_damaged_newest_checkpoint_falls_back_on_resume(toy_npz, tmp_path, caplog, tiny_config):
  caplog.set_level(logging.INFO, logger="irnet_jax")
  ref = train.train_and_evaluate(tiny_config(toy_npz), str(tmp_path / "ref"))
  with pytest.raises(_Kill):
    train.train_and_evaluate(tiny_config(toy_npz), str(tmp_path / "run"), step_hook=_kill_at(5))
  ckpt_dir = tmp_path / "run" / "checkpoints"
  assert checkpointing.Checkpointer(str(ckpt_dir)).all_steps() == [2, 4]
  for f in glob.glob(str(ckpt_dir / "4" / "model" / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")
  resumed = train.train_and_evaluate(tiny_config(toy_npz), str(tmp_path / "run"))
  assert "checkpoint 4" in caplog.text and "falling back" in caplog.text
  assert "resumed from step 2" in caplog.text  # Not from scratch (which would match too).
  assert resumed["params_fingerprint"] == ref["params_fingerprint"]


# ------------------------------------------------------------------ steps per call


@pytest.mark.slow
def test_k_steps_per_call_are_bit_identical_to_single_steps(toy_npz, tmp_path, tiny_config):
  def fingerprint_after(name, **overrides):
    # 16 steps: two calls of K=8, a checkpoint between them, a second epoch's data order.
    c = tiny_config(toy_npz, num_train_steps=16, log_every_steps=8, checkpoint_every_steps=8,
                    eval_every_steps=16, **{"dataset.augment": "shift", **overrides})
    return train.train_and_evaluate(c, str(tmp_path / name))["params_fingerprint"]

  # "scan" is what GPUs and TPUs run (one lax.scan of K steps): host pipeline and data
  # on the device, 1 and 4 devices. On this CPU "auto" dispatches the jitted step K
  # times (what users run here): checked once, and recorded in config.json.
  for devices, resident in ((1, False), (4, False), (1, True), (4, True)):
    common = dict(num_devices=devices, steps_per_call_mode="scan",
                  **{"dataset.cache_on_device": resident})
    name = f"d{devices}r{int(resident)}"
    assert fingerprint_after(name + "k1", steps_per_call=1, **common) == \
        fingerprint_after(name + "k8", steps_per_call=8, **common), name
  assert fingerprint_after("auto1", steps_per_call=1) == \
      fingerprint_after("auto8", steps_per_call=8)
  recorded = json.load(open(tmp_path / "auto8" / "config.json"))
  assert recorded["steps_per_call_mode"] == "dispatch"


def test_cadence_not_a_multiple_of_the_call_is_an_error_before_compiling(toy_npz, tmp_path,
                                                                         tiny_config):
  with pytest.raises(ValueError, match=r"log_every_steps=3 is not a multiple of "
                     r"config.steps_per_call=2.*log_every_steps=2 or 4"):
    train.train_and_evaluate(tiny_config(toy_npz, steps_per_call=2, log_every_steps=3),
                             str(tmp_path / "a"))
  # Per-epoch evaluation: 64 images / batch 16 = 4 steps an epoch, not a multiple of 3.
  with pytest.raises(ValueError, match=r"every epoch \(4 steps\).*steps_per_call=3.*\[2, 4\]"):
    train.train_and_evaluate(
        tiny_config(toy_npz, steps_per_call=3, log_every_steps=3, checkpoint_every_steps=3,
                    eval_every_steps=-1), str(tmp_path / "b"))
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_tensorboard_holds_the_metrics_and_profile_steps_leave_a_trace(toy_npz, tmp_path,
                                                                       tiny_config, read_metrics):
  from tensorboard.backend.event_processing import plugin_event_multiplexer as multiplexer
  workdir = tmp_path / "run"
  train.train_and_evaluate(tiny_config(toy_npz, eval_every_steps=3, profile_steps="2,4"),
                           str(workdir))
  events = multiplexer.EventMultiplexer()
  events.AddRunsFromDirectory(str(workdir / "tensorboard"))
  events.Reload()

  def scalars(split, tag):
    return {e.step: float(np.asarray(
        __import__("tensorboard").util.tensor_util.make_ndarray(e.tensor_proto)))
            for e in events.Tensors(split, tag)}

  for split, tags in (("train", ("loss", "lr", "ede_t", "ede_k", "accuracy")),
                      ("test", ("accuracy", "loss"))):
    records = read_metrics(workdir, split)
    assert records
    for tag in tags:
      np.testing.assert_allclose(
          [scalars(split, tag)[r["step"]] for r in records], [r[tag] for r in records],
          rtol=1e-6)
  # The first call's compilation is its own figure, kept out of the throughput.
  first, rest = read_metrics(workdir, "train")[0], read_metrics(workdir, "train")[1:]
  assert first["compile_seconds"] > 0 and "images_per_sec" not in first
  assert all("compile_seconds" not in r and r["images_per_sec"] > 0 for r in rest)
  traces = glob.glob(str(workdir / "tensorboard" / "plugins" / "profile" / "*" / "*.xplane.pb"))
  assert traces and os.path.getsize(traces[0]) > 0


def test_tensorboard_off_writes_no_event_files(toy_npz, tmp_path, tiny_config, read_metrics):
  train.train_and_evaluate(tiny_config(toy_npz, num_train_steps=2, tensorboard=False),
                           str(tmp_path))
  assert not os.path.exists(tmp_path / "tensorboard")
  assert read_metrics(tmp_path, "train")


def test_calls_end_on_multiples_of_k_even_when_resumed_off_the_grid():
  assert list(train._call_spans(0, 20, 8)) == [(0, 8), (8, 8), (16, 4)]
  # Resumed at step 20 with K = 30 (a checkpoint of a run with another K): one short
  # call back to 30, then whole calls; cadences (multiples of K) are all reached.
  assert list(train._call_spans(20, 100, 30)) == [(20, 10), (30, 30), (60, 30), (90, 10)]


def test_profile_span_inside_one_call_traces_that_call(tmp_path, monkeypatch):
  started = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: started.append(d))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: started.append("stop"))
  profiler = train._Profiler((20, 25), str(tmp_path))
  for step in range(0, 390, 13):  # K = 13: no call starts inside [20, 25).
    profiler.before(step, 13)
    profiler.after(step + 13, None)
  assert started == [str(tmp_path / "tensorboard"), "stop"]


def test_progress_bar_starts_after_compilation_and_rates_training_only(
    toy_npz, tmp_path, tiny_config, monkeypatch):
  bars = []

  class Bar:  # Records what tqdm is asked (its own output is not what is tested).
    def __init__(self, **kwargs):
      self.kwargs, self.n, self.start_t, self.postfixes = kwargs, kwargs["initial"], 0.0, []
      bars.append(self)

    def update(self, n):
      self.n += n

    def set_postfix(self, **values):
      self.postfixes.append(values)

    def close(self):
      pass

  monkeypatch.setattr(train, "tqdm", Bar)
  train.train_and_evaluate(tiny_config(toy_npz, progress_bar=True, eval_every_steps=2),
                           str(tmp_path))
  (bar,) = bars
  # Created after the first call (which compiles): step 1 is never the compile's.
  assert bar.kwargs["initial"] == 1 and bar.kwargs["smoothing"] == 0 and bar.n == 6
  assert "compile" in bar.postfixes[0]
  # Evaluations and checkpoints (every 2 steps) were taken out of the rate's clock.
  assert bar.start_t > 0
