"""irnet_jax: IR-Net binary neural networks in JAX / Flax NNX."""
__version__ = "0.1.0"
