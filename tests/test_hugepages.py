"""The launcher's huge-page re-exec (irnet_jax.hugepages)."""
import os
import subprocess
import sys

from irnet_jax import hugepages

_SCRIPT = ("import os, sys\n"
           "from irnet_jax import hugepages\n"
           "print('before', os.environ.get('GLIBC_TUNABLES', ''), flush=True)\n"
           "hugepages.reexec(sys.argv)\n"
           "print('after', os.environ.get('GLIBC_TUNABLES', ''))\n")


def test_opt_outs():
  assert not hugepages.wanted({"IRNET_JAX_HUGEPAGES": "0"})
  assert not hugepages.wanted({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})


def test_reexec_sets_the_tunable_once(tmp_path):
  script = tmp_path / "probe.py"
  script.write_text(_SCRIPT)
  env = {k: v for k, v in os.environ.items()
         if k not in ("GLIBC_TUNABLES", "IRNET_JAX_HUGEPAGES")}
  env["GLIBC_TUNABLES"] = "glibc.malloc.arena_max=4"  # kept, the tunable appended
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                       text=True, check=True).stdout.split("\n")
  if hugepages.wanted(env):
    # Re-executed: the first line is printed twice (before and after the exec), then
    # the process continues with both tunables and does not re-execute again.
    assert out[:3] == ["before glibc.malloc.arena_max=4",
                       f"before glibc.malloc.arena_max=4:{hugepages.TUNABLE}",
                       f"after glibc.malloc.arena_max=4:{hugepages.TUNABLE}"]
  else:  # not Linux/glibc >= 2.35 or THP off: left alone
    assert out[:2] == ["before glibc.malloc.arena_max=4", "after glibc.malloc.arena_max=4"]
