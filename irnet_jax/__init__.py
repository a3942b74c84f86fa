"""irnet_jax: IR-Net binary neural networks in JAX / Flax NNX."""
__version__ = "0.1.0"

# Submodules load lazily so that ``import irnet_jax`` stays light and
# ``python -m irnet_jax.summary`` does not find its module pre-imported.
_LAZY_SUBMODULES = ("diagnostics", "summary")


def __getattr__(name: str):
  import importlib
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"irnet_jax.{name}")
  if name == "model_summary":  # The function; ``irnet_jax.summary`` is the module.
    return importlib.import_module("irnet_jax.summary").summary
  raise AttributeError(f"module 'irnet_jax' has no attribute {name!r}")
