"""Deployment of IR-Net models: bit-packed weights and XOR/popcount inference.

* :func:`pack` / :func:`unpack` -- model -> :class:`PackedModel` (sign bits, 2^e
  scales, float stem/BN/shortcuts/classifier, a layer program) and back to kernels.
* :func:`save` / :func:`load` -- one versioned, checksummed file.
* :func:`infer` -- jitted inference with XOR + popcount GEMMs, equal to the float
  model's eval forward up to float rounding.

CLI: ``python -m irnet_jax.export --workdir=DIR --out=FILE``.
"""
from irnet_jax.bits import pack_bits, unpack_bits
from irnet_jax.export.format import FORMAT_VERSION, load, save
from irnet_jax.export.infer import infer, popcount_dot
from irnet_jax.export.pack import PackedModel, pack, unpack

__all__ = ["pack", "unpack", "save", "load", "infer", "PackedModel", "FORMAT_VERSION",
           "pack_bits", "unpack_bits", "popcount_dot"]
