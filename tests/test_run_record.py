"""What a run records in its workdir (irnet_jax.run_record): run.json's identity of the
run, checked on every restart, and config.json."""
import json

import pytest

from irnet_jax import config as config_lib
from irnet_jax import run_record
from irnet_jax import workdir as workdir_lib


def _config(**overrides):
  c = config_lib.base_config()
  c.model.num_classes = 10
  c.update_from_flattened_dict(overrides)  # dotted keys, e.g. **{"model.name": ...}
  return c


DERIVED = dict(num_train_examples=50000, steps_per_epoch=390, total_steps=156000)


def test_run_spec_has_the_defining_fields_only():
  spec = run_record.run_spec(_config())
  for field in ("model.name", "model.num_classes", "dataset.name", "batch_size", "seed",
                "optimizer.learning_rate", "optimizer.schedule", "ede.t_min",
                "ede.schedule_by", "num_epochs", "num_train_steps", "init_from"):
    assert field in spec, field
  assert not set(run_record.RESUMABLE_FIELDS) & spec.keys()
  assert spec["dataset.mean"] == [0.485, 0.456, 0.406]  # JSON values.


def test_check_run_accepts_resumable_changes_and_names_every_defining_one(tmp_path):
  w = str(tmp_path)
  run_record.check_run(w, _config(), DERIVED)  # A new workdir: nothing to compare.
  fingerprint = run_record.record_run(w, _config(), DERIVED)
  assert json.load(open(tmp_path / "run.json"))["fingerprint"] == fingerprint
  run_record.check_run(w, _config(progress_bar=False, num_devices=2, log_every_steps=7,
                                     eval_batch_size=100, **{"dataset.path": "/elsewhere",
                                                             "dataset.num_threads": 8}),
                          DERIVED)
  with pytest.raises(run_record.RunMismatchError) as e:
    run_record.check_run(w, _config(batch_size=256, **{"model.name": "vgg_small",
                                                          "ede.t_min": 0.1}), DERIVED)
  msg = str(e.value)
  for text in ("3 field(s)", "batch_size: 128 (recorded) vs 256 (now)",
               "model.name: 'resnet20' (recorded) vs 'vgg_small' (now)",
               "ede.t_min: 0.001 (recorded) vs 0.1 (now)", "use another --workdir",
               "--config.batch_size=128", "--config.model.name=resnet20",
               "Nothing in", "progress_bar"):
    assert text in msg, (text, msg)
  # The data behind an allowed path change is still checked by what follows from it.
  with pytest.raises(run_record.RunMismatchError, match="num_train_examples: 50000"):
    run_record.check_run(w, _config(), dict(DERIVED, num_train_examples=60000))


def test_fields_unknown_to_the_record_compare_as_their_default(tmp_path):
  # A workdir recorded before a field existed: the default means "same run".
  run_record.record_run(str(tmp_path), _config())
  record = json.load(open(tmp_path / "run.json"))
  del record["fields"]["init_from"]
  record["fields"]["a_removed_field"] = 3  # Unknown to today's config: ignored.
  json.dump(record, open(tmp_path / "run.json", "w"))
  run_record.check_run(str(tmp_path), _config())
  with pytest.raises(run_record.RunMismatchError, match="init_from: '' .recorded. vs 'W'"):
    run_record.check_run(str(tmp_path), _config(init_from="W"))


def test_damaged_run_and_config_files_name_the_file_and_the_fix(tmp_path):
  run_record.record_run(str(tmp_path), _config())
  (tmp_path / "run.json").write_text('{"fields": ')
  with pytest.raises(workdir_lib.WorkdirError, match=r"run.json is damaged.*rm "):
    run_record.check_run(str(tmp_path), _config())
  (tmp_path / "run.json").unlink()
  (tmp_path / "config.json").write_text("\x00\x00")
  with pytest.raises(workdir_lib.WorkdirError, match="config.json is damaged"):
    run_record.load_config(str(tmp_path))
  assert run_record.read_run(str(tmp_path)) is None  # No run.json: nothing recorded.
