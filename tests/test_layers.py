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


def _tiny_with_rows():
    from gemma_lab import layers
    from gemma_lab.testing import tiny_model

    model = tiny_model()
    plain = nnx.clone(model)
    layers.attach_rows(model)
    return model, plain


def test_kernel_rows_give_the_same_products_for_a_few_tokens():
    import pytest

    from gemma_lab.layers import Linear, attach_rows

    linear = Linear(12, 20, rngs=nnx.Rngs(0))
    attach_rows(linear)
    np.testing.assert_array_equal(linear.rows[...], linear.kernel[...].T)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 2, 12)))
    want = jnp.einsum("...I,IO->...O", x, linear.kernel[...])
    np.testing.assert_allclose(linear(x), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last axis of 12"):
        linear(x[..., :5])


def test_a_model_with_kernel_rows_gives_the_same_decode_steps():
    from gemma_lab.layers import KernelRows

    model, plain = _tiny_with_rows()
    assert any(isinstance(v, KernelRows) for _, v in nnx.iter_graph(model))
    tokens = jnp.asarray([[5, 9, 2], [7, 1, 4], [3, 3, 8]])
    # 3 prompts of 3 tokens, then one token each: both read the rows.
    for t in (tokens, tokens[:, :1]):
        np.testing.assert_allclose(model(t), plain(t), rtol=1e-4, atol=1e-4)
