"""The Checkpointer's damaged-vs-incompatible rule, damaged checkpoints moved aside so
that their steps are saved again, and restore_model/load_model, how every tool reads a
model from a workdir."""
import glob
import os

import pytest
from flax import nnx

from irnet_jax import checkpointing, models, run_record
from irnet_jax import config as config_lib
from irnet_jax import workdir as workdir_lib


def _state(name):
  return nnx.state(models.create(name, num_classes=10, rngs=nnx.Rngs(0)))


def test_checkpoints_of_another_run_or_model_are_errors_not_unreadable(tmp_path, caplog):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  state = _state("resnet20")
  ckpt.save(1, state, {"x": state["bn1"]["mean"]}, dict(step=1, run_fingerprint="a" * 64))
  ckpt.wait()
  meta = ckpt.restore_latest(state, fingerprint="a" * 64).meta
  assert meta["step"] == 1
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="another run"):
    ckpt.restore_latest(state, fingerprint="b" * 64)
  with pytest.raises(checkpointing.IncompatibleCheckpointError,
                     match=r"does not belong.*model: .*entries"):
    ckpt.restore_latest(_state("vgg_small"))
  assert "unreadable" not in caplog.text
  # Every checkpoint damaged: an error too, never a silent start from scratch.
  for f in glob.glob(str(tmp_path / "1" / "**" / "*"), recursive=True):
    if os.path.isfile(f):
      open(f, "wb").write(b"garbage")
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="can be read"):
    ckpt.restore_latest(state)
  assert "unreadable" in caplog.text
  ckpt.close()


# ------------------------------------------------------------------ damaged checkpoints


def _damage(step_dir):
  """Overwrites every file of a checkpoint (as a full disk or a bad copy would)."""
  for f in glob.glob(os.path.join(str(step_dir), "**", "*"), recursive=True):
    if os.path.isfile(f):
      with open(f, "wb") as fh:
        fh.write(b"garbage")


def _two_checkpoints(directory):
  state = _state("resnet20")
  opt = {"x": state["bn1"]["mean"]}
  ckpt = checkpointing.Checkpointer(str(directory))
  for step in (1, 2):
    ckpt.save(step, state, opt, dict(step=step))
  ckpt.wait()
  ckpt.close()
  return state, opt


def test_training_moves_a_damaged_checkpoint_aside_and_saves_its_step_again(tmp_path, caplog):
  state, opt = _two_checkpoints(tmp_path)
  _damage(tmp_path / "2")
  # A reader (no optimizer state: evaluate, export, init_from) falls back and moves nothing.
  reader = checkpointing.Checkpointer(str(tmp_path), create=False)
  assert reader.restore_latest(state)[2]["step"] == 1
  reader.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2"] and "moves it aside" in caplog.text
  # Training (optimizer state given) moves step 2 aside, then Orbax saves step 2 again:
  # before, Orbax kept step 2 in its list and skipped every save up to it.
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  assert ckpt.restore_latest(state, opt)[2]["step"] == 1
  assert ckpt.all_steps() == [1]
  moved = os.listdir(tmp_path / checkpointing.DAMAGED_DIR)
  assert len(moved) == 1 and moved[0].startswith("2-") and moved[0].endswith("Z")
  kept = tmp_path / checkpointing.DAMAGED_DIR / moved[0]
  assert any(open(f, "rb").read() == b"garbage"  # Kept as it was, for inspection.
             for f in glob.glob(str(kept / "**" / "*"), recursive=True) if os.path.isfile(f))
  ckpt.save(2, state, opt, dict(step=2))
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()
  assert checkpointing.Checkpointer(str(tmp_path)).all_steps() == [1, 2]  # On disk.
  assert "moved to" in caplog.text


def test_no_readable_checkpoint_moves_nothing(tmp_path):
  # Nothing restores: the storage (or this software) may be what fails, not the files.
  state, opt = _two_checkpoints(tmp_path)
  _damage(tmp_path / "1")
  _damage(tmp_path / "2")
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="Nothing was changed"):
    ckpt.restore_latest(state, opt)
  ckpt.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


# ------------------------------------------------------------------ restore_model


def test_restore_model_and_load_model_read_any_step_and_name_the_problem(tmp_path):
  c = config_lib.base_config()
  c.model.num_classes = 10
  run_record.save_config(str(tmp_path), c)
  with pytest.raises(ValueError, match=r"no checkpoint in .*Train or convert first"):
    checkpointing.load_model(str(tmp_path))
  model = config_lib.build_model(c, conv_impl="xla")
  state = nnx.state(model)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
  for step in (1, 2):
    kernel = state["conv1"]["kernel"]
    kernel.set_value(kernel.get_value() * 0 + step)  # step 1: all ones, step 2: all twos
    ckpt.save(step, state, {"x": state["bn1"]["mean"]}, dict(step=step, seed=7))
  ckpt.wait()
  ckpt.close()
  template = nnx.state(config_lib.build_model(c, conv_impl="xla"))
  restored, meta = checkpointing.restore_model(str(tmp_path), template)
  assert meta == dict(step=2, seed=7) and float(restored["conv1"]["kernel"][...].max()) == 2
  restored, meta = checkpointing.restore_model(str(tmp_path), template, step=1)
  assert meta["step"] == 1 and float(restored["conv1"]["kernel"][...].min()) == 1
  loaded, config = checkpointing.load_model(str(tmp_path), step=1)
  assert config.model.name == c.model.name and loaded.bn1.use_running_average  # eval()
  assert float(loaded.conv1.kernel[...].max()) == 1
  with pytest.raises(ValueError, match=r"no checkpoint for step 3 .*have \[1, 2\]"):
    checkpointing.restore_model(str(tmp_path), template, step=3)
  with pytest.raises(checkpointing.IncompatibleCheckpointError, match="does not fit"):
    checkpointing.restore_model(str(tmp_path), _state("vgg_small"), step=1)
  _damage(tmp_path / "checkpoints" / "1")
  with pytest.raises(workdir_lib.WorkdirError, match="checkpoint 1 .*cannot be read"):
    checkpointing.restore_model(str(tmp_path), template, step=1)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # Only read.


def test_a_checkpoint_rotated_away_while_read_is_not_damage(tmp_path, caplog, monkeypatch):
  # A live run with keep_checkpoints=1 saves step 6 and deletes step 4 while a reader
  # (evaluate, export) reads step 4: the reader takes step 6, warns of nothing.
  state = _state("resnet20")
  ckpt = checkpointing.Checkpointer(str(tmp_path), max_to_keep=1)
  ckpt.save(4, state, {"x": state["bn1"]["mean"]}, dict(step=4))
  ckpt.wait()
  reader = checkpointing.Checkpointer(str(tmp_path), create=False)
  original = checkpointing.Checkpointer.incompatibilities

  def racing(self, step, *args, **kwargs):
    if step == 4 and not os.path.exists(tmp_path / "6"):  # The run rotates, mid-read.
      ckpt.save(6, state, {"x": state["bn1"]["mean"]}, dict(step=6))
      ckpt.wait()
      raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "4"))
    return original(self, step, *args, **kwargs)

  monkeypatch.setattr(checkpointing.Checkpointer, "incompatibilities", racing)
  assert reader.restore_latest(state).meta["step"] == 6
  assert "unreadable" not in caplog.text and not os.path.exists(tmp_path / "4")
  reader.close()
  ckpt.close()
