"""notebooks/irnet_quickstart.ipynb: committed with the outputs of a full CPU run, and
still runs headless (QUICK mode) with the outputs it should give.

The kernel is an ipykernel of *this* interpreter: the test writes its own "python3"
kernelspec (``sys.executable -m ipykernel_launcher``) into a temporary directory that
goes first on ``JUPYTER_PATH``, so a kernelspec of another Python (user-level or
system-wide) is never picked, in this venv or a fresh CI one.
"""
import os
import pathlib
import re
import time

import pytest

import irnet_jax

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "irnet_quickstart.ipynb"
CELL_TIMEOUT_S = 300


def _kernel_env(tmp_path: pathlib.Path) -> dict:
  env = dict(os.environ)
  env["TMPDIR"] = str(tmp_path)  # The notebook's training workdir (tempfile.mkdtemp).
  env["IRNET_NOTEBOOK_QUICK"] = "1"
  env["JAX_PLATFORMS"] = "cpu"
  # What tests/conftest.py adds for the test process (4 simulated devices) is not for
  # the kernel: it runs the notebook as a user would, on one CPU device.
  flags = env.get("XLA_FLAGS", "")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags).strip()
  if flags:
    env["XLA_FLAGS"] = flags
  else:
    env.pop("XLA_FLAGS", None)
  env.pop("MPLBACKEND", None)  # Keep the kernel's inline backend (image/png outputs).
  return env


def _text(output) -> str:
  if output.get("output_type") == "stream":
    return output.get("text", "")
  return output.get("data", {}).get("text/plain", "")


def test_committed_notebook_holds_the_outputs_of_a_full_run():
  """A reader sees the results before running anything: every code cell has the
  outputs of a full (not QUICK) run without errors, with the installation skipped
  (docs/reproducibility.md: how to re-execute it)."""
  nb = nbformat.read(NOTEBOOK, as_version=4)
  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  empty = [i for i, c in enumerate(code_cells) if not c.get("outputs")]
  assert not empty, (f"code cells {empty} have no outputs: execute the notebook and commit "
                     "it with its outputs (docs/reproducibility.md)")
  outputs = [o for c in code_cells for o in c.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  everything = "\n".join(_text(o) for o in outputs)
  assert "QUICK = False" in everything
  assert re.search(r"devices: \[\w+Device\(id=0\)", everything), everything[:500]
  match = re.search(r"test accuracy: (\d\.\d+) on 360 test images after (\d+) steps", everything)
  assert match and int(match.group(2)) > 100, everything[-2000:]
  assert float(match.group(1)) > 0.9, match.group(0)
  assert "Successfully installed" not in everything
  assert len([o for o in outputs if "image/png" in o.get("data", {})]) >= 4


@pytest.mark.slow
def test_quickstart_notebook_runs(tmp_path, monkeypatch):
  kernels = tmp_path / "jupyter" / "kernels"
  kernelspec.write_kernel_spec(path=kernels / "python3")  # argv[0] = sys.executable
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  assert nb.metadata.kernelspec.name == "python3"
  for cell in nb.cells:  # Only what this run prints may satisfy the checks below.
    if cell.cell_type == "code":
      cell.outputs = []

  client = nbclient.NotebookClient(
      nb, kernel_name="python3", timeout=CELL_TIMEOUT_S,
      resources={"metadata": {"path": str(REPO / "notebooks")}})
  start = time.perf_counter()
  client.execute(env=_kernel_env(tmp_path))
  seconds = time.perf_counter() - start
  print(f"notebook executed in {seconds:.1f} s")

  code_cells = [c for c in nb.cells if c.cell_type == "code"]
  outputs = [o for c in code_cells for o in c.outputs]
  errors = [o for o in outputs if o.output_type == "error"]
  assert not errors, errors
  texts = [_text(o) for o in outputs]
  everything = "\n".join(texts)
  assert "Total params" in everything
  assert "QUICK = True" in everything
  # irnet_jax is importable here, so the install cell installs nothing.
  install = next(c for c in code_cells if "%pip install" in c.source)
  assert [_text(o) for o in install.outputs] == [f"irnet_jax {irnet_jax.__version__}\n"]
  match = re.search(r"test accuracy: (\d\.\d+) on 360 test images after 8 steps", everything)
  assert match, everything[-2000:]
  # A count over exactly the 360 test images (no padded or repeated examples), printed
  # to 4 decimals: some integer k in [0, 360] gives it.
  accuracy = float(match.group(1))
  assert any(abs(k / 360 - accuracy) < 5e-5 for k in range(361)), accuracy
  # The EDE and Libra-PB figures (matplotlib inline) and the write_report() PNGs.
  pngs = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(pngs) >= 4, f"only {len(pngs)} image/png outputs"
  assert "curves.png" in everything and "weight_entropy.png" in everything
