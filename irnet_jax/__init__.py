"""irnet_jax: IR-Net binary neural networks in JAX / Flax NNX."""
__version__ = "0.1.0"

# Submodules load lazily so that ``import irnet_jax`` stays light and
# ``python -m irnet_jax.summary`` does not find its module pre-imported.
_LAZY_SUBMODULES = ("diagnostics", "summary", "binarize", "methods", "layers", "ops",
                    "models", "optim")
# Functions of submodules, reachable as ``irnet_jax.NAME`` (loaded on first use).
_LAZY_FUNCTIONS = {"binarize_model": "binarize", "set_progress": "binarize",
                   "BinaryConv": "layers", "BinaryDense": "layers"}


def __getattr__(name: str):
  import importlib
  if name in _LAZY_SUBMODULES:
    return importlib.import_module(f"irnet_jax.{name}")
  if name in _LAZY_FUNCTIONS:
    return getattr(importlib.import_module(f"irnet_jax.{_LAZY_FUNCTIONS[name]}"), name)
  if name == "model_summary":  # The function; ``irnet_jax.summary`` is the module.
    return importlib.import_module("irnet_jax.summary").summary
  raise AttributeError(f"module 'irnet_jax' has no attribute {name!r}")
