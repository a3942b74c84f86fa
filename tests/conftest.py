"""Test setup: 4 simulated CPU devices so sharding is exercised without accelerators.

The XLA flag must be set before JAX initializes its backends, hence at import
time of this conftest (pytest imports it before any test module).
"""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Runs a test with float64 enabled (exact comparisons), restoring the flag after."""
  previous = jax.config.jax_enable_x64
  jax.config.update("jax_enable_x64", True)
  yield
  jax.config.update("jax_enable_x64", previous)


# Tests build the same few networks many times: a persistent compilation cache
# shared by the whole session makes every compile after the first a cache hit.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("IRNET_TEST_JAX_CACHE", "/tmp/irnet_jax_test_cache"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
