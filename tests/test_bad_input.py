"""Bad input is one error line naming the problem and the fix, raised by the config's
validation or the data's inspection: before the workdir is made and before compiling."""
import os
import struct
import zipfile

import numpy as np
import pytest

from irnet_jax import config as config_lib
from irnet_jax import data, train
from irnet_jax.data import sources


def _flip_byte_in(path, member):
  """Flips one byte of ``member``'s (stored or compressed) data in the zip ``path``, near
  its end (in the array's values, past the .npy header), so its CRC-32 no longer
  matches."""
  with zipfile.ZipFile(path) as zf:
    info = zf.getinfo(member)
  with open(path, "r+b") as f:
    f.seek(info.header_offset)
    local = f.read(30)
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    at = info.header_offset + 30 + name_len + extra_len + info.compress_size - 3
    f.seek(at)
    byte = f.read(1)
    f.seek(at)
    f.write(bytes([byte[0] ^ 0x10]))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_bit_flipped_npz_is_one_line_before_the_workdir(tmp_path, save, make_npz,
                                                        tiny_config):
  # Used to pass inspection, make the workdir, then fail with a traceback ending in
  # zipfile.BadZipFile: Bad CRC-32 for file 'x_train.npy'.
  path = tmp_path / "flipped.npz"
  with np.load(make_npz(tmp_path / "good.npz")) as good:
    save(path, **good)
  _flip_byte_in(path, "x_train.npy")
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    train.prepare(tiny_config(str(path)), str(workdir))
  message = str(e.value)
  assert "\n" not in message
  assert str(path) in message and "'x_train.npy'" in message
  assert "damaged" in message and "re-download or re-create" in message.lower()
  assert not os.path.exists(workdir)


def _stray_label_npz(write_indexed_npz, path, stray=3_000_000):
  """The indexed toy set (10 classes) with one training label ``stray``."""
  y_train = np.arange(40) % 10
  y_train[17] = stray
  return write_indexed_npz(path, num_classes=10, y_train=y_train)


def test_stray_label_is_refused_when_classes_come_from_the_data(tmp_path, tiny_config,
                                                                write_indexed_npz):
  # Used to build a 3,000,001-class model (a 1.4 GB checkpoint).
  path = _stray_label_npz(write_indexed_npz, tmp_path / "stray.npz")
  workdir = tmp_path / "run"
  with pytest.raises(ValueError) as e:
    train.prepare(tiny_config(path), str(workdir))
  message = str(e.value)
  assert "\n" not in message
  assert "3000000" in message and "11 distinct labels" in message
  assert "0, 1, 2" in message  # The label values found.
  assert "--config.model.num_classes=3000001" in message and "Fix the labels" in message
  assert not os.path.exists(workdir)


def test_stray_label_is_accepted_with_an_explicit_class_count(tmp_path, tiny_config,
                                                              write_indexed_npz):
  path = _stray_label_npz(write_indexed_npz, tmp_path / "stray.npz", stray=300)
  plan = train.prepare(tiny_config(path, **{"model.num_classes": 301}), str(tmp_path / "w"))
  assert plan.config.model.num_classes == 301
  assert data.dataset_info(tiny_config(path).dataset).num_classes == 301


@pytest.mark.parametrize("labels", [
    [0, 2, 4, 6, 8],       # Every other id unused: fewer than 17 empty classes.
    list(range(30)) + [50],  # 20 empty ids of 51, most used.
])
def test_label_sets_with_a_few_gaps_are_accepted(tmp_path, tiny_config, write_indexed_npz,
                                                labels):
  y_train = np.resize(np.asarray(labels), 40)
  path = write_indexed_npz(tmp_path / "gaps.npz", y_train=y_train,
                           y_test=np.resize(np.asarray(labels), 13))
  plan = train.prepare(tiny_config(path), str(tmp_path / "w"))
  assert plan.config.model.num_classes == max(labels) + 1


def test_sparse_list_file_labels_are_refused(tmp_path, tiny_config):
  root = tmp_path / "images"
  root.mkdir()
  for i in range(4):
    (root / f"{i}.png").write_bytes(b"")
  (tmp_path / "train.txt").write_text("0.png 0\n1.png 1\n2.png 500\n")
  (tmp_path / "test.txt").write_text("3.png 1\n")
  c = tiny_config("", **{"dataset.name": "filelist", "dataset.path": str(root),
                         "dataset.train_list": str(tmp_path / "train.txt"),
                         "dataset.test_list": str(tmp_path / "test.txt"),
                         "dataset.augment": "imagenet"})
  with pytest.raises(ValueError, match=r"train.txt.* 3 distinct labels \(0, 1, 500\).*"
                     r"--config.model.num_classes=501"):
    train.prepare(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_negative_label_is_refused_before_the_workdir(tmp_path, tiny_config,
                                                      write_indexed_npz):
  path = write_indexed_npz(tmp_path / "neg.npz", y_train=np.r_[np.arange(39) % 5, -1])
  with pytest.raises(ValueError, match=r"y_train in .* has the negative label -1"):
    train.prepare(tiny_config(path), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("field,value,allowed", [
    ("num_train_steps", 0, "-1 .*from num_epochs.* or a positive number of steps"),
    ("num_train_steps", -5, "-1 .*from num_epochs.* or a positive number of steps"),
    ("eval_every_steps", 0, "-1 .*every epoch.* or a positive number of steps"),
    ("eval_every_steps", -2, "-1 .*every epoch.* or a positive number of steps"),
])
def test_zero_or_negative_step_counts_are_refused(tmp_path, toy_npz, tiny_config, field,
                                                  value, allowed):
  # num_train_steps=0 used to train the whole recipe; eval_every_steps=0 meant every epoch.
  with pytest.raises(config_lib.ConfigError, match=rf"config.{field}={value} .*{allowed}"):
    train.prepare(tiny_config(toy_npz, **{field: value}), str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("ids,refused", [
    (range(10), False),
    ([3, 17], False),                 # 16 empty ids of 18: at most 16 may be empty...
    ([3, 18], True),                  # ... 17 of 19 may not.
    (list(range(40)) + [81], False),  # 41 empty ids beside 41 used: not most of them.
    (list(range(40)) + [82], True),   # 42 empty beside 41 used.
])
def test_mostly_empty_rule(ids, refused):
  ids = np.asarray(ids)
  class_ids = sources.ClassIds(ids, np.ones_like(ids), "labels")
  if refused:
    with pytest.raises(ValueError, match=f"--config.model.num_classes={ids[-1] + 1} "):
      sources.check_class_ids(class_ids)
  else:
    assert sources.check_class_ids(class_ids) == ids[-1] + 1
