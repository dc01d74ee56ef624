"""The vision-to-text bridge: average pooling and the multimodal projector.

Pooling is checked against a naive loop and PyTorch's `AvgPool2d`, the
projector against HF transformers' `Gemma3MultiModalProjector`.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_lab.vision.projector import MultimodalProjector, avg_pool_tokens

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def _naive_pool(features: np.ndarray, out_side: int) -> np.ndarray:
    b, p, e = features.shape
    side = int(round(p**0.5))
    window = side // out_side
    grid = features.reshape(b, side, side, e)
    out = np.zeros((b, out_side, out_side, e), np.float64)
    for row in range(out_side):
        for col in range(out_side):
            block = grid[
                :,
                row * window : (row + 1) * window,
                col * window : (col + 1) * window,
            ]
            out[:, row, col] = block.mean(axis=(1, 2))
    return out.reshape(b, out_side * out_side, e)


def test_avg_pool_matches_a_naive_loop():
    features = np.random.default_rng(0).normal(size=(2, 36, 5))
    pooled = avg_pool_tokens(jnp.asarray(features, jnp.float32), 4)
    np.testing.assert_allclose(pooled, _naive_pool(features, 2), atol=1e-6)


def test_gemma3_pooling_takes_4096_patches_to_256_in_4x4_windows():
    features = jnp.arange(4096, dtype=jnp.float32).reshape(1, 4096, 1)
    pooled = avg_pool_tokens(features, 256)
    assert pooled.shape == (1, 256, 1)
    # The first window covers rows 0-3, columns 0-3 of the 64 x 64 grid.
    first = np.mean([r * 64 + c for r in range(4) for c in range(4)])
    assert float(pooled[0, 0, 0]) == pytest.approx(first)
    # Soft token 17 is window row 1, column 1.
    token = np.mean([r * 64 + c for r in range(4, 8) for c in range(4, 8)])
    assert float(pooled[0, 17, 0]) == pytest.approx(token)


def test_avg_pool_matches_torch_avgpool2d():
    features = np.random.default_rng(1).normal(size=(3, 64, 7))
    reference = torch.nn.AvgPool2d(2, stride=2)(
        torch.tensor(features).transpose(1, 2).reshape(3, 7, 8, 8)
    )
    reference = reference.flatten(2).transpose(1, 2).numpy()
    pooled = avg_pool_tokens(jnp.asarray(features, jnp.float32), 16)
    np.testing.assert_allclose(pooled, reference, atol=1e-6)


def test_avg_pool_keeps_features_when_nothing_to_pool():
    features = jnp.ones((1, 256, 3)) * jnp.arange(256.0)[None, :, None]
    np.testing.assert_array_equal(avg_pool_tokens(features, 256), features)


@pytest.mark.parametrize(
    "patches, tokens_out, message",
    [
        (257, 256, "features.shape"),
        (64, 10, "tokens_out=10"),
        (64, 9, "does not divide"),
    ],
)
def test_avg_pool_rejects_grids_that_do_not_fit(patches, tokens_out, message):
    with pytest.raises(ValueError, match=message):
        avg_pool_tokens(jnp.zeros((1, patches, 2)), tokens_out)


def test_projector_is_norm_then_projection_without_sqrt_width():
    projector = MultimodalProjector(6, 10, tokens_out=4, rngs=nnx.Rngs(0))
    projector.norm.scale[...] = jnp.linspace(-0.5, 0.5, 6)
    features = np.random.default_rng(2).normal(size=(2, 16, 6))

    pooled = _naive_pool(features, 2)
    rms = np.sqrt(np.mean(pooled**2, axis=-1, keepdims=True) + 1e-6)
    normed = pooled / rms * (1 + np.linspace(-0.5, 0.5, 6))
    expected = normed @ np.asarray(projector.projection.kernel[...])

    soft = projector(jnp.asarray(features, jnp.float32))
    np.testing.assert_allclose(soft, expected, atol=1e-5)


def test_projector_matches_transformers():
    from transformers.models.gemma3 import modeling_gemma3

    config = transformers.Gemma3Config(
        text_config=dict(hidden_size=12, num_attention_heads=2, vocab_size=64),
        vision_config=dict(
            hidden_size=8,
            num_attention_heads=2,
            image_size=56,
            patch_size=7,
            layer_norm_eps=1e-5,
        ),
        mm_tokens_per_image=16,
    )
    torch.manual_seed(0)
    hf = modeling_gemma3.Gemma3MultiModalProjector(config).eval()
    with torch.no_grad():
        hf.mm_input_projection_weight.normal_()
        hf.mm_soft_emb_norm.weight.normal_()
    features = torch.randn(2, 64, 8)

    projector = MultimodalProjector(
        8, 12, tokens_out=16, eps=1e-5, rngs=nnx.Rngs(0)
    )
    projector.projection.kernel[...] = jnp.asarray(
        hf.mm_input_projection_weight.detach().numpy()
    )
    projector.norm.scale[...] = jnp.asarray(
        hf.mm_soft_emb_norm.weight.detach().numpy()
    )
    with torch.no_grad():
        expected = hf(features).numpy()
    soft = projector(jnp.asarray(features.numpy()))
    np.testing.assert_allclose(soft, expected, atol=1e-5)


def test_projector_rejects_features_of_another_width():
    projector = MultimodalProjector(6, 10, tokens_out=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"expected \[B, P, 6\]"):
        projector(jnp.zeros((1, 16, 5)))
