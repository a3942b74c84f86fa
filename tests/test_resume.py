"""Every run resumes (issue 29): the accelerator's call mode ("scan", forced here on the
CPU), a user's network with RNG state (``nnx.Dropout``), checkpoints whose array data
was corrupted, and logs that hold each step once whenever a kill came.

Kills are simulated in process: an exception from ``step_hook`` (or from inside the
metrics writer) ends the run like ``kill -9`` (what was committed stays, nothing more
is written), and ``os.kill(os.getpid(), SIGTERM)`` from ``step_hook`` is a real
preemption signal through the launcher's handler. The subprocess signal tests are in
test_preemption.py.
"""
import glob
import json
import logging
import os
import shutil
import signal

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from irnet_jax import checkpointing, evaluate, preemption, run_record, summary, train
from irnet_jax import workdir as workdir_lib
from irnet_jax.export.workdir import export_workdir


class _Kill(Exception):
  """Stands for kill -9."""


def _hook(step, action):
  def hook(done):
    if done == step:
      action()
  return hook


def _kill():
  raise _Kill()


def _sigterm():
  os.kill(os.getpid(), signal.SIGTERM)


def _config(tiny_config, toy_npz, steps_per_call=1, **overrides):
  # 8 steps: checkpoints and evaluations every 2, the accelerator's call mode.
  fields = dict(num_train_steps=8, eval_every_steps=2, log_every_steps=steps_per_call,
                steps_per_call=steps_per_call, steps_per_call_mode="scan")
  return tiny_config(toy_npz, **{**fields, **overrides})


def _interrupted_then_resumed(c, workdir, *stops):
  """Runs ``c`` into ``workdir`` once per ``(step, action)`` of ``stops``, each run
  stopped by its action at its step, then once more to the end; returns the final
  metrics."""
  for step, action in stops:
    with pytest.raises((_Kill, preemption.Preempted)):
      train.train_and_evaluate(c, str(workdir), step_hook=_hook(step, action))
  return train.train_and_evaluate(c, str(workdir))


# ------------------------------------------------------------------ scan mode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  """``{(data on the device, call mode): final metrics}`` of uninterrupted runs, made
  on first use (K steps per call give the parameters of K = 1 within a mode)."""
  runs = {}

  def get(c):
    key = (c.dataset.cache_on_device, c.steps_per_call_mode)
    if key not in runs:
      runs[key] = train.train_and_evaluate(c, str(tmp_path_factory.mktemp("uninterrupted")))
    return runs[key]

  return get


@pytest.mark.parametrize("k,resident,mode", [(1, False, "scan"), (2, False, "scan"),
                                             (2, True, "scan"), (2, True, "dispatch")],
                         ids=["k1", "k2", "k2_on_device", "dispatch_k2_on_device"])
def test_scan_mode_resumes_exactly_after_kill_and_sigterm(k, resident, mode, toy_npz,
                                                          tmp_path, tiny_config, read_metrics,
                                                          uninterrupted):
  c = _config(tiny_config, toy_npz, steps_per_call=k, steps_per_call_mode=mode,
              **{"dataset.cache_on_device": resident})
  ref = uninterrupted(c)
  # Killed after step 4 (checkpoint 4 committed, or with k=1 at step 3, between
  # checkpoints), then the resumed run preempted by SIGTERM at step 6, then resumed.
  # (Scan mode with K=2 and data on the device is preempted by a real SIGTERM in
  # test_preemption.py: here it is only killed.)
  sigterm = k == 1 or mode == "dispatch"
  resumed = _interrupted_then_resumed(c, tmp_path / "run", (3 if k == 1 else 4, _kill),
                                      *([(6, _sigterm)] if sigterm else []))
  assert resumed["params_fingerprint"] == ref["params_fingerprint"]
  assert [r["step"] for r in read_metrics(tmp_path / "run", "train")] == list(range(k, 9, k))
  assert [e["step"] for e in read_metrics(tmp_path / "run", "event")] == ([6] if sigterm
                                                                           else [])


def test_resume_in_the_other_call_mode_is_refused_with_the_flag(toy_npz, tmp_path,
                                                                 tiny_config):
  workdir = tmp_path / "run"
  with pytest.raises(_Kill):
    train.train_and_evaluate(_config(tiny_config, toy_npz), str(workdir),
                             step_hook=_hook(2, _kill))
  with pytest.raises(run_record.RunMismatchError,
                     match=r"steps_per_call_mode: 'scan' \(recorded\) vs 'dispatch' \(now\)"
                           r"[\s\S]*--config.steps_per_call_mode=scan"):
    train.train_and_evaluate(_config(tiny_config, toy_npz, steps_per_call_mode="auto"),
                             str(workdir))


# ------------------------------------------------------------------ a network with Dropout


class DropoutNet(nnx.Module):
  """A user's network with RNG state: conv-bn-relu twice, mean pool, Dropout, dense."""

  def __init__(self, *, num_classes: int = 10, rngs: nnx.Rngs):
    self.stem = nnx.Conv(3, 8, (3, 3), padding=1, rngs=rngs)
    self.bn0 = nnx.BatchNorm(8, rngs=rngs)
    self.conv1 = nnx.Conv(8, 16, (3, 3), padding=1, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.drop = nnx.Dropout(0.3, rngs=rngs)
    self.head = nnx.Linear(16, num_classes, rngs=rngs)

  def __call__(self, x):
    x = jax.nn.relu(self.bn0(self.stem(x)))
    x = self.bn1(self.conv1(x))
    return self.head(self.drop(jnp.mean(x, axis=(1, 2))))


def dropout_net(*, rngs: nnx.Rngs, num_classes: int = 10) -> DropoutNet:
  """The factory the launcher calls: ``--config.model.name=test_resume:dropout_net``."""
  return DropoutNet(num_classes=num_classes, rngs=rngs)


def test_a_network_with_dropout_resumes_exactly_then_evaluates_and_exports(
    toy_npz, tmp_path, tiny_config):
  c = _config(tiny_config, toy_npz, steps_per_call=2,
              **{"model.name": "test_resume:dropout_net", "model.binarize": "irnet"})
  ref = train.train_and_evaluate(c, str(tmp_path / "ref"))
  resumed = _interrupted_then_resumed(c, tmp_path / "run", (4, _sigterm), (6, _kill))
  assert resumed["params_fingerprint"] == ref["params_fingerprint"]
  # The RNG stream's count moved with training: it is part of the checkpointed state.
  model, _ = checkpointing.load_model(str(tmp_path / "run"))
  assert int(model.drop.rngs.count[...]) > 0
  # Evaluation is deterministic (Dropout off): the same numbers as the run's own.
  first = evaluate.evaluate_workdir(str(tmp_path / "run"))
  again = evaluate.evaluate_workdir(str(tmp_path / "run"))
  assert first["test_loss"] == again["test_loss"] == pytest.approx(ref["test_loss"], rel=1e-6)
  assert first["step"] == 8
  rows = summary.summary(model, (1, 8, 8, 3))
  assert rows.row("conv1").params == 8 * 16 * 9 + 16
  report = export_workdir(str(tmp_path / "run"), str(tmp_path / "model.irnet"))
  assert report["check_same_argmax"] and report["check_max_abs_diff"] < 1e-4


# ------------------------------------------------------------------ corrupt array data


def _array_files(step_dir):
  return sorted(f for f in glob.glob(os.path.join(step_dir, "*", "ocdbt.process_0", "d", "*"))
                if os.path.isfile(f))


def _flip(path, count=1):
  with open(path, "r+b") as f:
    data = bytearray(f.read())
    for i in range(count):
      data[len(data) // 2 + i] ^= 0xFF
    f.seek(0)
    f.write(data)


def test_a_flipped_byte_in_any_array_file_falls_back_to_the_newest_verified_step(
    toy_npz, tmp_path, tiny_config, caplog):
  c = _config(tiny_config, toy_npz, analysis_every_steps=2)
  ref = train.train_and_evaluate(c, str(tmp_path / "ref"))
  plan = train.prepare(c, str(tmp_path / "unused"))
  setup = train.build(plan.config, plan.devices, plan.steps_per_epoch, plan.total_steps)
  newest = tmp_path / "ref" / "checkpoints" / "8"
  by_item = {}
  for path in sorted(_array_files(newest), key=os.path.getsize, reverse=True):
    by_item.setdefault(os.path.relpath(path, newest).split(os.sep)[0], []).append(path)
  assert by_item.keys() == {"model", "opt", "signs"}

  def read(directory):
    reader = checkpointing.Checkpointer(str(directory), create=False)
    try:
      restored = reader.restore_latest(setup.state[0], setup.state[1], signs=setup.signs,
                                       repair=False)
    finally:
      reader.close()
    return restored.meta["step"], [train.params_fingerprint(x) for x in restored[:2]]

  workdir = tmp_path / "flipped"
  shutil.copytree(tmp_path / "ref" / "checkpoints", workdir, ignore=lambda d, names: ["8"])
  clean = {8: read(tmp_path / "ref" / "checkpoints")[1], 6: read(workdir)[1]}
  # The two largest files of each item (where its arrays' chunks are), 1 byte, then 16.
  for item, paths in by_item.items():
    for count, path in zip((1, 16), paths):
      shutil.rmtree(workdir / "8", ignore_errors=True)
      shutil.copytree(newest, workdir / "8")
      _flip(str(workdir / os.path.relpath(path, newest.parent)), count)
      step, got = read(workdir)
      # Never other arrays than those saved: a flip is caught (step 6), or lies where
      # Orbax reads nothing that reaches an array (an index node) and changes nothing.
      assert got == clean[step], os.path.relpath(path, newest)
      if count == 1:  # The largest file holds chunk data: its flip must be caught.
        assert step == 6, os.path.relpath(path, newest)
  # A user's view: evaluate names the bad step and uses step 6; the run moves step 8
  # aside, trains steps 7-8 again and ends with the uninterrupted parameters.
  workdir = tmp_path / "run"
  shutil.copytree(tmp_path / "ref", workdir)
  _flip(str(workdir / os.path.relpath(by_item["model"][0], tmp_path / "ref")))
  caplog.set_level(logging.WARNING, logger="irnet_jax")
  out = evaluate.evaluate_workdir(str(workdir))
  assert out["step"] == 6 and "checkpoint 8" in caplog.text and "corrupt" in caplog.text
  again = train.train_and_evaluate(c, str(workdir))
  assert again["params_fingerprint"] == ref["params_fingerprint"]
  assert os.listdir(workdir / "checkpoints" / checkpointing.DAMAGED_DIR)


# ------------------------------------------------------------------ the logs after kills


def _kill_in_writer(monkeypatch, split, step, how):
  """Makes :meth:`MetricsWriter.write` die (like kill -9) at record ``(split, step)``:
  ``"before"`` it writes, ``"half_line"`` after a cut JSON line, ``"half_scalars"`` with
  the whole JSON line and the first 3 TensorBoard scalars on disk."""
  original = workdir_lib.MetricsWriter.write

  def write(self, record):
    if (record.get("split"), record.get("step")) != (split, step):
      return original(self, record)
    if how == "half_line":
      with open(self.path, "a") as f:
        f.write(json.dumps(record)[:25])
    elif how == "half_scalars":
      tensorboard, self.tensorboard = self.tensorboard, False
      original(self, record)
      self.tensorboard = tensorboard
      first = {k: float(record[k]) for k in list(record)[2:5]}  # After step and split.
      self._tb_writer(split, step).write(first, step)  # pylint: disable=protected-access
    raise _Kill()

  monkeypatch.setattr(workdir_lib.MetricsWriter, "write", write)


def _logged(records):
  """{(split, step): sorted keys} of records; asserts each (split, step) is there once."""
  out = {}
  for r in records:
    key = (r["split"], r["step"])
    assert key not in out, f"{key} logged twice"
    out[key] = sorted(k for k in r if k not in ("images_per_sec", "compile_seconds"))
  return out


def test_logs_hold_every_step_once_whenever_the_kills_came(toy_npz, tmp_path, tiny_config,
                                                         monkeypatch, read_tensorboard):
  c = _config(tiny_config, toy_npz, analysis_every_steps=2, steps_per_call_mode="dispatch")
  train.train_and_evaluate(c, str(tmp_path / "ref"))
  workdir = str(tmp_path / "run")
  # Four runs, each killed at another moment, then one to the end: just after
  # checkpoint 2 committed; while writing step 4's test record (before checkpoint 4);
  # mid-way through step 6's analysis scalars; in the middle of a JSON line at step 8.
  with pytest.raises(_Kill):
    train.train_and_evaluate(c, workdir, step_hook=_hook(2, _kill))
  for split, step, how in (("test", 4, "before"), ("analysis", 6, "half_scalars"),
                           ("analysis", 8, "half_line")):
    with monkeypatch.context() as m:
      _kill_in_writer(m, split, step, how)
      with pytest.raises(_Kill):
        train.train_and_evaluate(c, workdir)
  train.train_and_evaluate(c, workdir)

  def read(w):
    with open(os.path.join(w, "metrics.jsonl")) as f:
      return [json.loads(line) for line in f]

  expected = _logged(read(str(tmp_path / "ref")))
  assert _logged(read(workdir)) == expected
  analyses = [k for split, k in expected if split == "analysis"]
  assert analyses == [2, 4, 6, 8]
  for step in analyses[1:]:  # Flip ratios after the first analysis, resumed or not.
    assert any(k.startswith("flip_ratio/") for k in expected["analysis", step])
  ref_tb, got_tb = read_tensorboard(str(tmp_path / "ref")), read_tensorboard(workdir)
  assert got_tb.keys() == ref_tb.keys()
  for key, points in ref_tb.items():
    # Timings: a run's first call logs compile_seconds, not images_per_sec.
    if key[1] not in ("compile_seconds", "images_per_sec"):
      assert [s for s, _ in got_tb[key]] == [s for s, _ in points], key
