"""The library's bit layout (irnet_jax.bits): uint32 words, LSB first."""
import jax
import jax.numpy as jnp
import numpy as np

from irnet_jax import bits


def _np_pack(b):
  """Reference: numpy's little-endian bit order, bytes viewed as little-endian uint32
  -- the documented layout (element k: word k // 32, bit k % 32)."""
  b = np.asarray(b, bool)
  pad = np.zeros(b.shape[:-1] + (-b.shape[-1] % 32,), bool)
  packed = np.packbits(np.concatenate([b, pad], -1), axis=-1, bitorder="little")
  return np.ascontiguousarray(packed).view("<u4")


def test_pack_bits_layout_and_round_trip():
  rng = np.random.default_rng(0)
  for k in (1, 31, 32, 33, 144, 577):
    b = rng.random((3, k)) < 0.5
    words = np.asarray(bits.pack_bits(b))
    assert words.shape == (3, bits.num_words(k)) == (3, -(-k // 32))
    assert words.dtype == np.uint32
    np.testing.assert_array_equal(words, _np_pack(b))
    np.testing.assert_array_equal(bits.unpack_bits(words, k), b)


def test_ternary_planes_round_trip_traced():
  x = jnp.asarray(np.random.default_rng(1).choice([-1.0, 0.0, 1.0], size=(2, 5, 13)))
  sign, nonzero = jax.jit(bits.pack_ternary)(x)
  assert sign.shape == nonzero.shape == (2, 5, 1) and sign.dtype == jnp.uint32
  np.testing.assert_array_equal(sign, _np_pack(x < 0))
  np.testing.assert_array_equal(nonzero, _np_pack(x != 0))
  back = jax.jit(bits.unpack_ternary, static_argnums=(1, 2))((sign, nonzero), 13, jnp.float32)
  np.testing.assert_array_equal(back, x)


def test_nan_is_kept_in_the_unused_plane_combination():
  x = jnp.asarray([[1.0, np.nan, -1.0, 0.0, np.nan, -1.0]])
  sign, nonzero = bits.pack_ternary(x)
  # NaN: sign set, nonzero clear -- the combination no ternary value uses.
  np.testing.assert_array_equal(sign, _np_pack(np.asarray([[0, 1, 1, 0, 1, 1]], bool)))
  np.testing.assert_array_equal(nonzero, _np_pack(np.asarray([[1, 0, 1, 0, 0, 1]], bool)))
  np.testing.assert_array_equal(bits.unpack_ternary((sign, nonzero), 6, jnp.float32), x)
