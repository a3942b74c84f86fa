"""Preemption end to end: SIGTERM/SIGINT mid-run -> checkpoint of the reached step, an
``event`` record, exit code 75; SIGKILL mid-run -> the last committed checkpoint; the
same command then resumes to the same parameters as a run never interrupted. One
process (our Python handlers), in the call mode of GPUs and TPUs ("scan", forced on
this CPU, two steps per call over data held on the device), and two processes over
loopback (JAX's preemption service and sync point, gloo collectives)."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from irnet_jax import preemption

# Steps of a whole run, so that a signal sent after step SIGNAL_AFTER_STEP lands mid-run:
# one process makes ~35 steps/s on an idle 2-core CPU, two over gloo far fewer (2-25
# steps/s measured on a busy one).
SINGLE_STEPS, TWO_PROCESS_STEPS = 100, 24
SIGNAL_AFTER_STEP = 3  # Signal once metrics.jsonl shows this many train steps.
RUN_TIMEOUT_S = 300  # A whole launch, start-up and compilation included (2 busy cores).
EXIT_TIMEOUT_S = 60  # From the signal to the exit.


def _overrides(npz, total):
  return [f"--config.dataset.path={npz}", "--config.dataset.name=npz",
          "--config.dataset.augment=none", "--config.dataset.image_size=8",
          "--config.batch_size=16", "--config.eval_batch_size=8",
          "--config.progress_bar=False", "--config.dataset.num_threads=0",
          "--config.log_every_steps=1", "--config.checkpoint_every_steps=100000",
          f"--config.eval_every_steps={total}", f"--config.num_train_steps={total}",
          "--config.ede.schedule_by=step", "--config.model.num_classes=4",
          # Neither matters here and both cost (diagnostics compile their own program).
          "--config.analysis_every_steps=0", "--config.tensorboard=False"]


# The single-process launches: the accelerator's way to run steps, forced on the CPU.
SCAN = ["--config.steps_per_call_mode=scan", "--config.steps_per_call=2",
        "--config.log_every_steps=2", "--config.dataset.cache_on_device=True"]


def _env():
  # One CPU device per process; its own XLA flags (not conftest's four devices).
  # os.environ holds the session's persistent compilation cache (conftest.py): launches
  # after the first skip most of the compilation.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


class _Launch:
  """One ``python -m irnet_jax.main`` process in its own session (process group),
  output to a file (no pipe to fill up), killed with its group by :meth:`kill`."""

  def __init__(self, workdir, npz, total, log_path, cwd, extra=()):
    self.workdir, self.log_path = str(workdir), str(log_path)
    cmd = [sys.executable, "-m", "irnet_jax.main", "--config=quickstart",
           f"--workdir={workdir}", *_overrides(npz, total), *extra]
    self.log = open(log_path, "w")
    self.proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=self.log,
                                 stderr=subprocess.STDOUT, start_new_session=True)

  def output(self):
    with open(self.log_path) as f:
      return f.read()[-4000:]

  def wait(self, timeout):
    try:
      return self.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      self.kill()
      pytest.fail(f"no exit within {timeout} s:\n{self.output()}")

  def kill(self):
    if self.proc.poll() is None:
      try:
        os.killpg(self.proc.pid, signal.SIGKILL)
      except ProcessLookupError:
        pass
      self.proc.wait(timeout=30)
    self.log.close()


def _kill_all(launches):
  for launch in launches:
    launch.kill()


def _records(workdir, split):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        break  # A line being written.
      if record.get("split") == split:
        records.append(record)
  return records


def _wait_for_train_steps(launches, workdir, steps, total):
  """Blocks until ``workdir``'s metrics.jsonl logged train step ``steps``."""
  deadline = time.monotonic() + RUN_TIMEOUT_S
  while time.monotonic() < deadline:
    done = [r["step"] for r in _records(workdir, "train")]
    if done and max(done) >= steps:
      assert max(done) < total, "the run ended before the signal: raise its steps"
      return
    for launch in launches:
      if launch.proc.poll() is not None:
        pytest.fail(f"exited with {launch.proc.returncode} before the signal:\n"
                    f"{launch.output()}")
    time.sleep(0.02)
  pytest.fail(f"no train step {steps} within {RUN_TIMEOUT_S} s:\n{launches[0].output()}")


def _fingerprint(workdir):
  with open(os.path.join(workdir, "final_metrics.json")) as f:
    return json.load(f)["params_fingerprint"]


def _check_preempted(workdir, total):
  """The event record and the checkpoint of its step; returns that step."""
  events = _records(workdir, "event")
  assert len(events) == 1 and events[0]["preempted"] == 1.0, events
  step = events[0]["step"]
  assert SIGNAL_AFTER_STEP <= step < total, (step, total)
  checkpoints = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints"))
                       if d.isdigit())
  assert checkpoints == [step], (checkpoints, step)
  assert not os.path.exists(os.path.join(workdir, "final_metrics.json"))
  return step


def _run_to_end(launches):
  for launch in launches:
    rc = launch.wait(RUN_TIMEOUT_S)
    assert rc == 0, f"exit code {rc}:\n{launch.output()}"


@pytest.fixture(scope="module")
def launch(toy_npz, repo_root):
  """``launch(workdir, total, log_path, extra=())``: a :class:`_Launch` on the toy set."""
  def start(workdir, total, log_path, extra=()):
    return _Launch(workdir, toy_npz, total, log_path, repo_root, extra)
  return start


@pytest.fixture(scope="module")
def uninterrupted_single(launch, tmp_path_factory):
  """params_fingerprint of a single-process run never interrupted."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  run = launch(workdir, SINGLE_STEPS, workdir / "log.txt", SCAN)
  try:
    _run_to_end([run])
  finally:
    run.kill()
  return _fingerprint(workdir)


def _launch_mid_run(launch, workdir, log_path, launches, extra=()):
  """Starts a single-process run into ``workdir`` and returns once it logged train step
  SIGNAL_AFTER_STEP. The launch joins ``launches`` before the wait, so that the caller's
  cleanup kills it when the wait fails."""
  launches.append(launch(workdir, SINGLE_STEPS, log_path, SCAN + list(extra)))
  _wait_for_train_steps(launches, workdir, SIGNAL_AFTER_STEP, SINGLE_STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_exits_75_and_resumes_exactly(signum, launch, uninterrupted_single,
                                                         tmp_path):
  workdir = tmp_path / "run"
  launches = []
  try:
    _launch_mid_run(launch, workdir, tmp_path / "log1.txt", launches)
    launches[0].proc.send_signal(signum)
    rc = launches[0].wait(EXIT_TIMEOUT_S)
    assert rc == preemption.EXIT_CODE, f"exit code {rc}:\n{launches[0].output()}"
    _check_preempted(workdir, SINGLE_STEPS)
    launches.append(launch(workdir, SINGLE_STEPS, tmp_path / "log2.txt", SCAN))
    _run_to_end(launches[1:])
  finally:
    _kill_all(launches)
  assert _fingerprint(workdir) == uninterrupted_single


@pytest.mark.slow
def test_sigkill_resumes_from_the_last_committed_checkpoint_exactly(launch,
                                                                    uninterrupted_single,
                                                                    tmp_path):
  workdir = tmp_path / "run"
  launches = []
  try:  # Checkpoints every 2 steps (a resumable field: the same run as the reference).
    _launch_mid_run(launch, workdir, tmp_path / "log1.txt", launches,
                    ["--config.checkpoint_every_steps=2"])
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not os.path.isdir(workdir / "checkpoints" / "2") and time.monotonic() < deadline:
      time.sleep(0.02)  # Orbax renames a step's directory into place when it commits.
    launches[0].proc.send_signal(signal.SIGKILL)
    assert launches[0].wait(EXIT_TIMEOUT_S) == -signal.SIGKILL
    assert not _records(workdir, "event")
    launches.append(launch(workdir, SINGLE_STEPS, tmp_path / "log2.txt", SCAN))
    _run_to_end(launches[1:])
  finally:
    _kill_all(launches)
  assert "resumed from step" in launches[1].output()
  assert _fingerprint(workdir) == uninterrupted_single


@pytest.mark.slow
def test_second_launch_into_a_running_workdir_is_refused(launch, uninterrupted_single,
                                                          tmp_path):
  # The same command again (a launch with another config is refused by run.json first).
  workdir = tmp_path / "run"
  launches = []
  try:
    _launch_mid_run(launch, workdir, tmp_path / "first.txt", launches)
    # Held still (its lock too) so that it is mid-run whenever the second one starts.
    launches[0].proc.send_signal(signal.SIGSTOP)
    started = time.monotonic()
    launches.append(launch(workdir, SINGLE_STEPS, tmp_path / "second.txt", SCAN))
    rc = launches[1].wait(60)
    launches[0].proc.send_signal(signal.SIGCONT)
    assert rc not in (0, preemption.EXIT_CODE) and time.monotonic() - started < 30
    message = launches[1].output()
    assert f"pid {launches[0].proc.pid}" in message and "Traceback" not in message, message
    _run_to_end(launches[:1])
  finally:
    _kill_all(launches)
  assert _fingerprint(workdir) == uninterrupted_single
  with open(workdir / "run.json") as f:
    assert json.load(f)["fields"]["seed"] == 0


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch_two(launch, workdir, tmp_path, tag):
  port = _free_port()
  return [launch(workdir, TWO_PROCESS_STEPS, tmp_path / f"{tag}_{i}.txt",
                  [f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                   f"--process_id={i}"]) for i in range(2)]


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(launch, tmp_path):
  reference = tmp_path / "uninterrupted"
  launches = []
  try:
    # The uninterrupted pair runs alongside the interrupted one (its own port): start-up
    # and compilation are most of a launch (process 1 compiles every time: only process
    # 0 uses the persistent cache), and they overlap.
    launches += _launch_two(launch, reference, tmp_path, "uninterrupted")
    workdir = tmp_path / "run"
    launches += _launch_two(launch, workdir, tmp_path, "interrupted")
    _wait_for_train_steps(launches[2:], workdir, SIGNAL_AFTER_STEP, TWO_PROCESS_STEPS)
    launches[3].proc.send_signal(signal.SIGTERM)  # Process 1 only: JAX tells process 0.
    for running in launches[2:]:
      rc = running.wait(EXIT_TIMEOUT_S)
      assert rc == preemption.EXIT_CODE, f"exit code {rc}:\n{running.output()}"
    step = _check_preempted(workdir, TWO_PROCESS_STEPS)
    for running in launches[2:]:  # Each process stopped after that same step.
      assert f"stopped by a preemption signal after step {step};" in running.output()
    launches += _launch_two(launch, workdir, tmp_path, "resumed")
    _run_to_end(launches[:2] + launches[4:])
  finally:
    _kill_all(launches)
  assert _fingerprint(workdir) == _fingerprint(reference)
