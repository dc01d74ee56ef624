"""The ViT encoder, its pure functions, weight loading and preprocessing.

The encoder is checked against HF transformers' `SiglipVisionModel` on a tiny
random config, the pure functions against naive versions or PyTorch.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from gemma_lab.checkpoints.hf_siglip import (
    GEMMA3_PREFIX,
    load_siglip_from_hf,
    siglip_params_from_hf,
)
from gemma_lab.vision import (
    DINOV2_SMALL_224,
    IMAGENET_MEAN,
    IMAGENET_STD,
    SIGLIP_SO400M_896,
    VisionEncoder,
    ViTConfig,
    preprocess_images,
)
from gemma_lab.vision.encoder import (
    attention_probs,
    cubic_resize_matrix,
    layer_norm,
    patchify,
    resize_position_grid,
)
from gemma_lab.vision.weights import assign_params, param_shapes

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY_SIGLIP = ViTConfig(
    image_size=28,
    patch_size=7,
    width=32,
    depth=2,
    num_heads=4,
    mlp_dim=64,
    num_positions=16,
)


def _hf_siglip(config: ViTConfig, *, use_head: bool = False):
    torch.manual_seed(0)
    hf_config = transformers.SiglipVisionConfig(
        hidden_size=config.width,
        intermediate_size=config.mlp_dim,
        num_hidden_layers=config.depth,
        num_attention_heads=config.num_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
        layer_norm_eps=config.layer_norm_eps,
        vision_use_head=use_head,
    )
    model = transformers.SiglipVisionModel(hf_config).eval()
    # Random, non-trivial norms and biases, so that every weight matters.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.1 * torch.randn_like(param))
    return model


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


# Encoder vs transformers ----------------------------------------------------


def test_siglip_encoder_matches_transformers():
    hf = _hf_siglip(TINY_SIGLIP)
    encoder = VisionEncoder(TINY_SIGLIP, rngs=nnx.Rngs(0))
    load_siglip_from_hf(encoder, hf.state_dict())
    pixels = np.random.default_rng(0).uniform(-1, 1, (2, 28, 28, 3))
    pixels = pixels.astype(np.float32)

    with torch.no_grad():
        torch_pixels = torch.from_numpy(pixels.transpose(0, 3, 1, 2))
        expected = hf(pixel_values=torch_pixels).last_hidden_state.numpy()
    with jax.default_matmul_precision("float32"):
        actual = encoder(jnp.asarray(pixels))

    assert actual.shape == (2, 16, 32)
    assert _relative_error(actual, expected) < 1e-4


def test_siglip_params_accept_the_gemma3_prefix():
    hf = _hf_siglip(TINY_SIGLIP)
    state = {GEMMA3_PREFIX + k: v for k, v in hf.state_dict().items()}
    state["language_model.model.norm.weight"] = torch.zeros(3)

    params = siglip_params_from_hf(state)

    encoder = VisionEncoder(TINY_SIGLIP, rngs=nnx.Rngs(0))
    assert set(params) == set(param_shapes(encoder))
    kernel = params["blocks.1.attention.query.kernel"]
    weight = hf.state_dict()["encoder.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(kernel, weight.numpy().T)


def test_siglip_params_reject_the_pooling_head():
    hf = _hf_siglip(TINY_SIGLIP, use_head=True)
    with pytest.raises(ValueError, match="head.probe"):
        siglip_params_from_hf(hf.state_dict())


def test_loading_is_all_or_nothing():
    encoder = VisionEncoder(TINY_SIGLIP, rngs=nnx.Rngs(0))
    before = np.asarray(encoder.patch_embedding.kernel[...])
    params = {
        name: np.zeros(shape, np.float32)
        for name, shape in param_shapes(encoder).items()
    }
    params["blocks.1.mlp.fc2.kernel"] = np.zeros((3, 3), np.float32)
    del params["final_norm.bias"]

    with pytest.raises(ValueError) as error:
        assign_params(encoder, params, unmatched=["extra.weight"])

    message = str(error.value)
    for part in ("extra.weight", "final_norm.bias", "blocks.1.mlp.fc2"):
        assert part in message
    np.testing.assert_array_equal(encoder.patch_embedding.kernel[...], before)


# Encoder behaviour ----------------------------------------------------------


def test_encode_returns_only_the_attention_layers_asked_for():
    config = dataclasses.replace(TINY_SIGLIP, use_class_token=True)
    encoder = VisionEncoder(config, rngs=nnx.Rngs(1))

    encoding = encoder.encode(jnp.ones((2, 28, 28, 3)), attention_layers=(1,))

    assert encoding.features.shape == (2, 17, 32)
    assert list(encoding.attention) == [1]
    probs = encoding.attention[1]
    assert probs.shape == (2, 4, 17, 17)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)


def test_encode_works_under_jit_with_static_layers():
    encoder = VisionEncoder(TINY_SIGLIP, rngs=nnx.Rngs(0))
    pixels = jnp.ones((1, 28, 28, 3))

    @nnx.jit(static_argnames="layers")
    def run(model, pixels, layers):
        return model.encode(pixels, attention_layers=layers)

    jitted = run(encoder, pixels, (0,))
    eager = encoder.encode(pixels, attention_layers=(0,))
    np.testing.assert_allclose(jitted.features, eager.features, atol=1e-5)


def test_encoder_interpolates_positions_for_other_image_sizes():
    encoder = VisionEncoder(TINY_SIGLIP, rngs=nnx.Rngs(0))
    assert encoder(jnp.zeros((1, 42, 21, 3))).shape == (1, 18, 32)


def test_encoder_rejects_bad_pixels_and_layers():
    encoder = VisionEncoder(TINY_SIGLIP, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="B, height, width, 3"):
        encoder(jnp.zeros((28, 28, 3)))
    with pytest.raises(ValueError, match="multiples of patch_size=7"):
        encoder(jnp.zeros((1, 30, 28, 3)))
    with pytest.raises(ValueError, match="attention_layers"):
        encoder.encode(jnp.zeros((1, 28, 28, 3)), attention_layers=(2,))


def test_bfloat16_compute_stays_close_to_float32():
    encoder32 = VisionEncoder(TINY_SIGLIP, rngs=nnx.Rngs(0))
    encoder16 = VisionEncoder(TINY_SIGLIP, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    pixels = jax.random.uniform(jax.random.key(0), (1, 28, 28, 3))

    low = encoder16(pixels)

    assert low.dtype == jnp.bfloat16
    assert encoder16.patch_embedding.kernel[...].dtype == jnp.float32
    assert _relative_error(low.astype(jnp.float32), encoder32(pixels)) < 3e-2


# Pure functions -------------------------------------------------------------


def test_patchify_then_kernel_equals_a_strided_convolution():
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=(2, 14, 21, 3)).astype(np.float32)
    weight = rng.normal(size=(5, 3, 7, 7)).astype(np.float32)
    kernel = weight.transpose(2, 3, 1, 0).reshape(-1, 5)

    ours = jnp.einsum("BTC,CD->BTD", patchify(jnp.asarray(pixels), 7), kernel)
    conv = torch.nn.functional.conv2d(
        torch.from_numpy(pixels.transpose(0, 3, 1, 2)),
        torch.from_numpy(weight),
        stride=7,
    )
    expected = conv.flatten(2).transpose(1, 2).numpy()
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_layer_norm_matches_naive_formula():
    x = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 3 + 1
    scale, bias = jnp.arange(8.0), jnp.ones(8)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    naive = (x - mean) / jnp.sqrt(var + 1e-6) * scale + bias
    np.testing.assert_allclose(
        layer_norm(x, scale, bias, 1e-6), naive, atol=1e-5
    )


def test_attention_probs_match_naive_softmax():
    keys_ = jax.random.split(jax.random.key(0), 2)
    queries = jax.random.normal(keys_[0], (1, 3, 2, 4))
    keys = jax.random.normal(keys_[1], (1, 5, 2, 4))

    probs = attention_probs(queries, keys)

    scores = np.einsum("btnh,bsnh->bnts", queries, keys) / 2.0
    naive = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
    np.testing.assert_allclose(probs, naive, rtol=1e-5)


@pytest.mark.parametrize(("in_size", "out_size"), [(37, 16), (4, 9), (5, 5)])
def test_cubic_resize_matrix_matches_torch_bicubic(in_size, out_size):
    signal = np.random.default_rng(0).normal(size=in_size)
    expected = torch.nn.functional.interpolate(
        torch.from_numpy(signal)[None, None, None, :].repeat(1, 1, 4, 1),
        size=(4, out_size),
        mode="bicubic",
        align_corners=False,
    )[0, 0, 0].numpy()

    actual = cubic_resize_matrix(in_size, out_size) @ signal
    np.testing.assert_allclose(actual, expected, atol=1e-10)


def test_resize_position_grid_matches_torch_bicubic():
    table = np.random.default_rng(0).normal(size=(36, 3)).astype(np.float32)
    grid = torch.from_numpy(table.reshape(1, 6, 6, 3)).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(
        grid, size=(4, 9), mode="bicubic", align_corners=False
    )
    expected = expected.permute(0, 2, 3, 1).reshape(36, 3).numpy()

    actual = resize_position_grid(jnp.asarray(table), 4, 9)
    np.testing.assert_allclose(actual, expected, atol=1e-5)


# Config ---------------------------------------------------------------------


def test_presets_have_the_published_shapes():
    assert SIGLIP_SO400M_896.num_patches == SIGLIP_SO400M_896.num_positions
    assert SIGLIP_SO400M_896.num_tokens == 4096
    assert SIGLIP_SO400M_896.head_dim == 72
    assert DINOV2_SMALL_224.num_tokens == 257
    assert DINOV2_SMALL_224.position_grid == 37


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": 30}, "multiple of patch_size"),
        ({"num_heads": 5}, "multiple of num_heads"),
        ({"num_positions": 15}, "perfect square"),
        ({"mlp_activation": "relu"}, "mlp_activation"),
        ({"depth": 0}, "depth=0"),
    ],
)
def test_config_rejects_inconsistent_numbers(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(TINY_SIGLIP, **change)


# Preprocessing --------------------------------------------------------------


def test_white_and_black_images_map_to_plus_and_minus_one():
    white = np.full((50, 30, 3), 255, np.uint8)
    black = Image.new("RGB", (20, 40), (0, 0, 0))

    pixels = preprocess_images([white, black], size=16)

    assert pixels.shape == (2, 16, 16, 3)
    assert pixels.dtype == np.float32
    np.testing.assert_array_equal(pixels[0], 1.0)
    np.testing.assert_array_equal(pixels[1], -1.0)


def test_rgba_is_composited_onto_white():
    transparent = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    half = np.zeros((8, 8, 4), np.float32)
    half[..., 3] = 0.5

    pixels = preprocess_images([transparent, half], size=8)

    np.testing.assert_array_equal(pixels[0], 1.0)
    np.testing.assert_allclose(pixels[1], 0.0, atol=1e-6)


def test_grayscale_becomes_three_equal_channels():
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))
    images = [gray, gray[..., None], Image.fromarray(gray)]

    pixels = preprocess_images(images, size=16)

    np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
    np.testing.assert_array_equal(pixels[0], pixels[1])
    np.testing.assert_array_equal(pixels[0], pixels[2])
    np.testing.assert_allclose(
        pixels[0, 0, :, 0], gray[0] / 127.5 - 1.0, atol=1e-6
    )


def test_float_images_in_unit_range_match_uint8():
    image = np.random.default_rng(0).integers(0, 256, (40, 30, 3), np.uint8)

    from_uint8 = preprocess_images(image, size=20)
    from_float = preprocess_images(image / 255.0, size=20)

    np.testing.assert_allclose(from_float, from_uint8, atol=2 / 127.5)


def test_imagenet_normalisation():
    white = np.full((4, 4, 3), 255, np.uint8)

    pixels = preprocess_images(
        white, size=4, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )

    expected = (1 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
    np.testing.assert_allclose(pixels[0, 0, 0], expected, rtol=1e-6)


def test_batch_of_different_sizes():
    images = [np.zeros((h, w, 3), np.uint8) for h, w in [(10, 20), (33, 7)]]
    assert preprocess_images(images, size=14).shape == (2, 14, 14, 3)


@pytest.mark.parametrize(
    ("image", "error", "message"),
    [
        (np.zeros((4, 4, 2), np.uint8), ValueError, r"\[H, W, 4\]"),
        (np.zeros((4, 4, 3), np.int32), TypeError, "dtype int32"),
        (np.full((4, 4, 3), 255.0), ValueError, "expected \\[0, 1\\]"),
        ("photo.png", TypeError, "images is a str"),
    ],
)
def test_preprocess_rejects_bad_images(image, error, message):
    with pytest.raises(error, match=message):
        preprocess_images(image, size=4)


def test_preprocess_needs_mean_and_std_together():
    with pytest.raises(ValueError, match="both or neither"):
        preprocess_images(np.zeros((4, 4), np.uint8), size=4, mean=(0, 0, 0))
