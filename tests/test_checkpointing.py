"""Workdir identity (run.json), the Checkpointer's damaged-vs-incompatible rule, and
damaged checkpoints moved aside so that their steps are saved again."""
import glob
import json
import os

import pytest
from flax import nnx

from irnet_jax import checkpointing, config as config_lib, models
from irnet_jax import workdir as workdir_lib


def _config(**overrides):
  c = config_lib.base_config()
  c.model.num_classes = 10
  c.update_from_flattened_dict(overrides)  # dotted keys, e.g. **{"model.name": ...}
  return c


DERIVED = dict(num_train_examples=50000, steps_per_epoch=390, total_steps=156000)


def test_run_spec_has_the_defining_fields_only():
  spec = checkpointing.run_spec(_config())
  for field in ("model.name", "model.num_classes", "dataset.name", "batch_size", "seed",
                "optimizer.learning_rate", "optimizer.schedule", "ede.t_min",
                "ede.schedule_by", "num_epochs", "num_train_steps", "init_from"):
    assert field in spec, field
  assert not set(checkpointing.RESUMABLE_FIELDS) & spec.keys()
  assert spec["dataset.mean"] == [0.485, 0.456, 0.406]  # JSON values.


def test_check_run_accepts_resumable_changes_and_names_every_defining_one(tmp_path):
  w = str(tmp_path)
  checkpointing.check_run(w, _config(), DERIVED)  # A new workdir: nothing to compare.
  fingerprint = checkpointing.record_run(w, _config(), DERIVED)
  assert json.load(open(tmp_path / "run.json"))["fingerprint"] == fingerprint
  checkpointing.check_run(w, _config(progress_bar=False, num_devices=2, log_every_steps=7,
                                     eval_batch_size=100, **{"dataset.path": "/elsewhere",
                                                             "dataset.num_threads": 8}),
                          DERIVED)
  with pytest.raises(checkpointing.RunMismatchError) as e:
    checkpointing.check_run(w, _config(batch_size=256, **{"model.name": "vgg_small",
                                                          "ede.t_min": 0.1}), DERIVED)
  msg = str(e.value)
  for text in ("3 field(s)", "batch_size: 128 (recorded) vs 256 (now)",
               "model.name: 'resnet20' (recorded) vs 'vgg_small' (now)",
               "ede.t_min: 0.001 (recorded) vs 0.1 (now)", "use another --workdir",
               "--config.batch_size=128", "--config.model.name=resnet20",
               "Nothing in", "progress_bar"):
    assert text in msg, (text, msg)
  # The data behind an allowed path change is still checked by what follows from it.
  with pytest.raises(checkpointing.RunMismatchError, match="num_train_examples: 50000"):
    checkpointing.check_run(w, _config(), dict(DERIVED, num_train_examples=60000))


def test_fields_unknown_to_the_record_compare_as_their_default(tmp_path):
  # A workdir recorded before a field existed: the default means "same run".
  checkpointing.record_run(str(tmp_path), _config())
  record = json.load(open(tmp_path / "run.json"))
  del record["fields"]["init_from"]
  record["fields"]["a_removed_field"] = 3  # Unknown to today's config: ignored.
  json.dump(record, open(tmp_path / "run.json", "w"))
  checkpointing.check_run(str(tmp_path), _config())
  with pytest.raises(checkpointing.RunMismatchError, match="init_from: '' .recorded. vs 'W'"):
    checkpointing.check_run(str(tmp_path), _config(init_from="W"))


def _state(name):
  return nnx.state(models.create(name, num_classes=10, rngs=nnx.Rngs(0)))


def test_checkpoints_of_another_run_or_model_are_errors_not_unreadable(tmp_path, caplog):
  ckpt = checkpointing.Checkpointer(str(tmp_path))
  state = _state("resnet20")
  ckpt.save(1, state, {"x": state["bn1"]["mean"]}, dict(step=1, run_fingerprint="a" * 64))
  ckpt.wait()
  model, _, meta = ckpt.restore_latest(state, fingerprint="a" * 64)
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


def test_damaged_run_and_config_files_name_the_file_and_the_fix(tmp_path):
  checkpointing.record_run(str(tmp_path), _config())
  (tmp_path / "run.json").write_text('{"fields": ')
  with pytest.raises(workdir_lib.WorkdirError, match=r"run.json is damaged.*rm "):
    checkpointing.check_run(str(tmp_path), _config())
  (tmp_path / "run.json").unlink()
  (tmp_path / "config.json").write_text("\x00\x00")
  with pytest.raises(workdir_lib.WorkdirError, match="config.json is damaged"):
    checkpointing.load_config(str(tmp_path))
  assert checkpointing.read_run(str(tmp_path)) is None  # No run.json: nothing recorded.
