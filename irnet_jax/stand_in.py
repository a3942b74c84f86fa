"""A module that stands in for a layer on a copy of a model being traced.

The exporter (:mod:`irnet_jax.export.trace`) and the summary (:mod:`irnet_jax.summary`)
read a model's forward by replacing, on a copy, each layer of interest with a module
that calls it. The forward still reads the layer's attributes through its parent
(``self.conv.features``, ...), so the stand-in answers those from the layer.
"""
from __future__ import annotations

from typing import Any

from flax import nnx


class StandIn(nnx.Module):
  """Holds ``layer`` and forwards to it the attribute reads the stand-in cannot answer
  itself; a subclass defines ``__call__`` (how the layer is called)."""

  def __init__(self, layer: nnx.Module):
    self.layer = layer

  def __getattr__(self, name: str) -> Any:
    # Only reached for names the stand-in lacks: what the forward reads from the layer.
    # "layer" is missing until __init__ sets it, or while nnx (clone, merge) builds an
    # instance without __init__: self.layer would recurse. Dunders are not forwarded, so
    # that protocols (copy, pickle) never take the layer's for the stand-in's.
    layer = vars(self).get("layer")
    if layer is None or name.startswith("__"):
      raise AttributeError(name)
    return getattr(layer, name)
