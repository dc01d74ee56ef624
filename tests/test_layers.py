import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_lab.layers import Embedder, gelu_tanh, rms_norm


def test_gelu_is_the_tanh_approximation():
    assert float(gelu_tanh(jnp.float32(1.0))) == np.float32(0.841192)
    assert abs(float(gelu_tanh(jnp.float32(1.0))) - 0.841345) > 1e-4


def test_rms_norm_with_zero_scale_is_plain_normalisation():
    x = jnp.array([[3.0, -4.0, 0.0, 12.0]])
    out = rms_norm(x, jnp.zeros(4), eps=0.0)
    expected = x / jnp.sqrt(jnp.mean(x**2))
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_rms_norm_scale_is_an_offset_from_one():
    x = jnp.array([[1.0, -1.0]])
    out = rms_norm(x, jnp.array([1.0, 0.5]), eps=0.0)
    np.testing.assert_allclose(out, [[2.0, -1.5]], rtol=1e-6)


def test_rms_norm_computes_in_float32_and_returns_input_dtype():
    x = jnp.full((1, 8), 300.0, jnp.bfloat16)
    out = rms_norm(x, jnp.zeros(8, jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), 1.0)


def test_embedding_is_scaled_by_sqrt_width_in_activation_dtype():
    emb = Embedder(10, 16, rngs=nnx.Rngs(0), dtype=jnp.bfloat16)
    out = emb.encode(jnp.array([[3]]))
    table = np.asarray(emb.embedding[...][3].astype(jnp.bfloat16), np.float32)
    np.testing.assert_allclose(np.asarray(out[0, 0], np.float32), table * 4.0)
    assert out.dtype == jnp.bfloat16
