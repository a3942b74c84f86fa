"""irnet_jax.workdir: metrics.jsonl and TensorBoard agree (as TensorBoard's own reader
sees them, resume included), and the workdir lock refuses a second run."""
import errno
import json
import logging
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from irnet_jax import workdir as workdir_lib
from irnet_jax.workdir import MetricsWriter, WorkdirBusyError, WorkdirLock


def _jsonl(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _scalars_of(records) -> dict:
  """The same mapping, built from metrics.jsonl's records."""
  out = {}
  for r in records:
    for k, v in r.items():
      if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
        out.setdefault((r["split"], k), []).append((r["step"], v))
  return out


def _assert_same(tensorboard: dict, records) -> None:
  expected = _scalars_of(records)
  assert sorted(tensorboard) == sorted(expected)
  for key, points in expected.items():
    got = tensorboard[key]
    assert [s for s, _ in got] == [s for s, _ in points], key
    np.testing.assert_allclose([v for _, v in got], [v for _, v in points], rtol=1e-6,
                               err_msg=str(key))  # Event files hold float32.


def _train(step, loss):
  return dict(step=step, split="train", loss=loss, accuracy=0.5 + step / 1e4, lr=0.1 / step,
              ede_t=np.float32(step / 300), ede_k=np.array(2.0), images_per_sec=1234.5)


def test_tensorboard_matches_metrics_jsonl(tmp_path, read_tensorboard):
  wd = str(tmp_path)
  with MetricsWriter(wd, enabled=True) as writer:
    for step in (100, 200, 300):
      writer.write(_train(step, loss=3.0 - step / 200))
    writer.write(dict(step=300, split="test", loss=2.5, accuracy=0.25, top5_accuracy=0.6,
                      count=10000))
    writer.write(dict(step=300, split="event", what="preempted", final=True))  # No scalar.
  records = _jsonl(wd)
  assert [r["step"] for r in records] == [100, 200, 300, 300, 300]
  assert records[0]["ede_k"] == 2.0 and isinstance(records[0]["ede_t"], float)
  assert sorted(os.listdir(os.path.join(wd, "tensorboard"))) == ["test", "train"]
  tensorboard = read_tensorboard(wd)
  assert ("train", "loss") in tensorboard and ("test", "top5_accuracy") in tensorboard
  _assert_same(tensorboard, [r for r in records if r["split"] != "event"])


def test_truncate_after_on_resume_drops_later_records_in_both(tmp_path, read_tensorboard):
  wd = str(tmp_path)
  first = MetricsWriter(wd, enabled=True)  # The run that is killed after step 400.
  for step in (100, 200, 300, 400):
    first.write(_train(step, loss=float(step)))
  first.write(dict(step=200, split="test", loss=9.0, accuracy=0.1))
  first.write(dict(step=400, split="test", loss=8.0, accuracy=0.2))
  first.write(dict(step=300, split="analysis", mean_abs_w=0.3))  # Not re-logged below.
  first.close()
  with open(os.path.join(wd, "metrics.jsonl"), "a") as f:
    f.write('{"step": 500, "split": "tra')  # A line cut by the kill.

  resumed = MetricsWriter(wd, enabled=True)  # Resumes from the checkpoint of step 200.
  resumed.truncate_after(200)
  assert [(r["step"], r["split"]) for r in _jsonl(wd)] == [
      (100, "train"), (200, "train"), (200, "test")]
  for step in (300, 400):
    resumed.write(_train(step, loss=-float(step)))  # Other values: the new ones must win.
  resumed.write(dict(step=400, split="test", loss=7.0, accuracy=0.3))
  resumed.close()

  records = _jsonl(wd)
  assert [(r["step"], r["split"]) for r in records] == [
      (100, "train"), (200, "train"), (200, "test"), (300, "train"), (400, "train"),
      (400, "test")]
  tensorboard = read_tensorboard(wd)
  assert tensorboard["train", "loss"] == [(100, 100.0), (200, 200.0), (300, -300.0),
                                          (400, -400.0)]
  assert ("analysis", "mean_abs_w") not in tensorboard  # Purged although never re-written.
  _assert_same(tensorboard, records)


def test_resume_in_a_fresh_workdir_and_without_truncate(tmp_path, read_tensorboard):
  # truncate_after(0) before anything exists, as a fresh run does; then a second writer
  # that never calls truncate_after appends after it.
  wd = str(tmp_path)
  with MetricsWriter(wd, enabled=True) as writer:
    writer.truncate_after(0)
    writer.write(_train(100, loss=1.0))
  with MetricsWriter(wd, enabled=True) as writer:
    writer.write(_train(200, loss=2.0))
  _assert_same(read_tensorboard(wd), _jsonl(wd))


def test_tensorboard_false_writes_only_jsonl_and_disabled_writes_nothing(tmp_path):
  on, off = tmp_path / "on", tmp_path / "off"
  on.mkdir()
  off.mkdir()
  with MetricsWriter(str(on), enabled=True, tensorboard=False) as writer:
    writer.truncate_after(0)
    writer.write(_train(100, loss=1.0))
  assert os.listdir(on) == ["metrics.jsonl"]
  with MetricsWriter(str(off), enabled=False) as writer:
    writer.truncate_after(0)
    writer.write(_train(100, loss=1.0))
  assert os.listdir(off) == []


def test_missing_tensorboardx_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorboardX", None)  # Makes the import fail.
  with pytest.raises(ImportError, match="--config.tensorboard=False"):
    MetricsWriter(str(tmp_path), enabled=True)
  MetricsWriter(str(tmp_path), enabled=True, tensorboard=False)  # Needs no tensorboardX.
  MetricsWriter(str(tmp_path), enabled=False)


def test_records_tensorboard_cannot_place_are_refused_before_any_write(tmp_path):
  with MetricsWriter(str(tmp_path), enabled=True) as writer:
    with pytest.raises(ValueError, match="no 'step'"):
      writer.write(dict(split="train", loss=1.0))
    with pytest.raises(ValueError, match="plain directory name"):
      writer.write(dict(step=1, split="../up", loss=1.0))
    writer.write(dict(split="event", what="started"))  # No scalar: no step needed.
  assert [r.get("split") for r in _jsonl(str(tmp_path))] == ["event"]


# ------------------------------------------------------------------ the lock

_TRY_LOCK = """
import sys
from irnet_jax.workdir import WorkdirLock, WorkdirBusyError
try:
  WorkdirLock(sys.argv[1], int(sys.argv[2])).acquire()
except WorkdirBusyError as e:
  print("busy", e)
else:
  print("ok")
"""


def _try_lock_elsewhere(workdir, process_index=0) -> str:
  """Another process's attempt: "ok" or "busy <message>"."""
  out = subprocess.run([sys.executable, "-c", _TRY_LOCK, str(workdir), str(process_index)],
                       capture_output=True, text=True, timeout=60, check=True)
  return out.stdout.strip()


def test_lock_refuses_a_second_process_until_released(tmp_path):
  wd = tmp_path / "run"  # Created by the lock.
  lock = WorkdirLock(str(wd))
  with lock:
    assert lock.held and os.listdir(wd) == [".lock"]  # Nothing else in the workdir.
    with open(wd / ".lock") as f:
      holder = json.load(f)
    assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
    answer = _try_lock_elsewhere(wd)
    assert answer.startswith("busy") and f"pid {os.getpid()} on {socket.gethostname()}" in answer
    assert "--workdir" in answer and "\n" not in answer
    # Another process index of a multi-host run has its own lock.
    assert _try_lock_elsewhere(wd, process_index=1) == "ok"
    assert sorted(os.listdir(wd)) == [".lock", ".lock.1"]
    with pytest.raises(WorkdirBusyError, match="this very process") as e:
      WorkdirLock(str(wd)).acquire()
    assert e.value.holder["pid"] == os.getpid()
  assert not lock.held
  assert _try_lock_elsewhere(wd) == "ok"


def test_lock_left_by_a_dead_process_is_taken(tmp_path, caplog):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  with open(tmp_path / ".lock", "w") as f:
    json.dump(dict(pid=dead.pid, host=socket.gethostname(), started="then"), f)
  with caplog.at_level(logging.INFO, logger=workdir_lib.__name__):
    with WorkdirLock(str(tmp_path)):
      with open(tmp_path / ".lock") as f:
        assert json.load(f)["pid"] == os.getpid()
  assert f"pid {dead.pid}" in caplog.text and "ended without releasing" in caplog.text


def test_a_lock_released_cleanly_is_taken_without_a_word(tmp_path, caplog):
  # A finished run released its lock: its rerun is not crash recovery.
  with WorkdirLock(str(tmp_path)):
    pass
  with open(tmp_path / ".lock") as f:
    assert json.load(f)["released"]
  with caplog.at_level(logging.INFO, logger=workdir_lib.__name__):
    with WorkdirLock(str(tmp_path)):
      with open(tmp_path / ".lock") as f:
        assert "released" not in json.load(f)
  assert "taking over" not in caplog.text


# ------------------------------------------------------------------ symlinks in the workdir


def _outside(tmp_path):
  """A file outside the workdir that a symlink in it points to, and the workdir."""
  outside = tmp_path / "outside.txt"
  outside.write_text("precious\n")
  workdir = tmp_path / "run"
  workdir.mkdir()
  return outside, workdir


@pytest.mark.parametrize("name", ["run.json", "config.json", "final_metrics.json"])
def test_atomic_writes_replace_a_symlink_instead_of_writing_through_it(tmp_path, name):
  # pylint: disable-next=import-outside-toplevel
  from irnet_jax import config as config_lib
  from irnet_jax import run_record
  outside, workdir = _outside(tmp_path)
  c = config_lib.base_config()
  c.model.num_classes = 10
  # The link points at a file the run can read (a record of the same run), so that
  # record_run gets as far as writing.
  outside.write_text({"run.json": json.dumps(dict(fields={})), "config.json": c.to_json(),
                      "final_metrics.json": "precious\n"}[name])
  before = outside.read_text()
  (workdir / name).symlink_to(outside)
  if name == "final_metrics.json":
    workdir_lib.write_json_atomic(str(workdir / name), {"test_accuracy": 0.5})
  else:
    run_record.record_run(str(workdir), c)
  assert outside.read_text() == before
  assert not (workdir / name).is_symlink() and json.loads((workdir / name).read_text())
  assert sorted(os.listdir(workdir)) == sorted({"run.json", "config.json", name} if
                                               name != "final_metrics.json" else {name})


def test_a_symlink_at_the_temporary_name_is_not_followed(tmp_path):
  # The temporary used to be PATH.tmp<pid>: a link placed there was written through.
  outside, workdir = _outside(tmp_path)
  path = workdir / "final_metrics.json"
  os.symlink(outside, f"{path}.tmp{os.getpid()}")
  workdir_lib.write_json_atomic(str(path), {"test_accuracy": 0.5})
  assert outside.read_text() == "precious\n"
  assert json.loads(path.read_text()) == {"test_accuracy": 0.5}


def test_write_atomic_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
  path = tmp_path / "f.json"
  workdir_lib.write_atomic(str(path), "old")
  assert oct(path.stat().st_mode & 0o777) == oct(workdir_lib._FILE_MODE)
  monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(OSError(28, "full")))
  with pytest.raises(OSError):
    workdir_lib.write_atomic(str(path), "new")
  assert path.read_text() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_metrics_and_lock_never_write_through_a_symlink(tmp_path):
  outside, workdir = _outside(tmp_path)
  (workdir / "metrics.jsonl").symlink_to(outside)
  with pytest.raises(workdir_lib.WorkdirError, match=r"metrics.jsonl is a symbolic link.*rm "):
    MetricsWriter(str(workdir), enabled=True, tensorboard=False)
  # A link put in place after the writer was made: refused at the append too.
  (workdir / "metrics.jsonl").unlink()
  writer = MetricsWriter(str(workdir), enabled=True, tensorboard=False)
  (workdir / "metrics.jsonl").symlink_to(outside)
  with pytest.raises(workdir_lib.WorkdirError, match="symbolic link"):
    writer.write(_train(1, 2.0))
  (workdir / ".lock").symlink_to(outside)
  with pytest.raises(workdir_lib.WorkdirError, match=r"\.lock is a symbolic link"):
    WorkdirLock(str(workdir)).acquire()
  assert outside.read_text() == "precious\n"


# ------------------------------------------------------------------ error lines


def test_error_lines_of_os_errors_name_the_path_and_what_to_do():
  full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/w/checkpoints/100")
  assert workdir_lib.error_line(full) == (
      "error: No space left on device: /w/checkpoints/100; the disk is full: free space "
      "and rerun the same command (what was written before, checkpoints included, is "
      "kept).")
  read_only = PermissionError(errno.EROFS, os.strerror(errno.EROFS), "/w/metrics.jsonl")
  assert "read-only" in workdir_lib.error_line(read_only)
  # A library's message (not one of ours, which name the fix): how to see where.
  try:
    json.loads("{")
  except ValueError as e:
    line = workdir_lib.error_line(e)
  assert line.startswith("error: JSONDecodeError: ") and "--debug" in line
