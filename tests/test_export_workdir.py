"""irnet_jax.export.workdir: exporting a workdir's model (python -m irnet_jax.export).

Most of the export tests are in test_export.py (the package); this file holds those of
export_workdir's own checks."""
import pytest

from irnet_jax import workdir as workdir_lib
from irnet_jax.export.workdir import export_workdir


def test_export_out_in_a_missing_directory_is_said_before_restoring(tmp_path):
  with pytest.raises(FileNotFoundError) as e:  # tmp_path holds no run: nothing restored.
    export_workdir(str(tmp_path), str(tmp_path / "nowhere" / "m.irnet"))
  assert workdir_lib.error_line(e.value).startswith(
      "error: the directory of --out does not exist")
