"""A ViT image encoder in Flax NNX: SigLIP (Gemma 3) and DINOv2 in one module.

The image is cut into square patches, each flattened patch is projected to a
token, position embeddings are added (resized bicubically when the patch grid
differs from the stored grid), an optional class token is prepended, and
pre-LayerNorm transformer blocks follow, then an optional final LayerNorm.
The forward pass follows HF transformers' `SiglipVisionModel` and
`Dinov2Model`, including PyTorch's bicubic resize (a = -0.75, half-pixel
centres, edge clamping) for the position table.

Letters used in shapes and einsums:
    B batch, T query tokens, S key tokens, N heads, H head width, D width,
    F MLP hidden width, C values in one flattened patch (patch² × 3),
    Y, X target patch-grid rows and columns, U, V stored position-grid rows
    and columns, I, O input and output features of a projection.

Parameters are stored in `param_dtype` and cast to the compute `dtype` at
use; LayerNorm statistics and the softmax run in float32. Attention
probabilities of chosen blocks can be returned through `VisionEncoder.encode`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_lab.vision.config import ViTConfig

# PyTorch's bicubic convolution constant (torch.nn.functional.interpolate and
# ONNX Resize with cubic_coeff_a=-0.75); Keys' classic value is -0.5.
_CUBIC_A = -0.75
_INIT_STDDEV = 0.02


# ----------------------------------------------------------------------------
# Pure functions.
# ----------------------------------------------------------------------------


def patchify(pixels: jax.Array, patch_size: int) -> jax.Array:
    """Cuts images into flattened, non-overlapping square patches.

    Args:
        pixels: [B, Y * patch_size, X * patch_size, 3] images.
        patch_size: side of a patch in pixels.

    Returns:
        [B, Y * X, C] patches in row-major grid order; each patch is flattened
        as (row in patch, column in patch, channel), C = patch_size² × 3.
    """
    batch, height, width, channels = pixels.shape
    rows, cols = height // patch_size, width // patch_size
    grid = pixels.reshape(batch, rows, patch_size, cols, patch_size, channels)
    grid = grid.transpose(0, 1, 3, 2, 4, 5)
    return grid.reshape(batch, rows * cols, patch_size * patch_size * channels)


def layer_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float
) -> jax.Array:
    """LayerNorm over the last axis, statistics in float32.

    Args:
        x: [..., D] activations.
        scale: [D] multiplier.
        bias: [D] offset.
        eps: added to the variance before the square root.

    Returns:
        [..., D] normalised activations in the dtype of `x`.
    """
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    variance = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(variance + eps)
    normed = normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return normed.astype(x.dtype)


def attention_probs(queries: jax.Array, keys: jax.Array) -> jax.Array:
    """Softmax attention weights of every query over every key, unmasked.

    Args:
        queries: [B, T, N, H].
        keys: [B, S, N, H].

    Returns:
        [B, N, T, S] float32 probabilities; each row over S sums to 1.
    """
    queries = queries * queries.shape[-1] ** -0.5
    scores = jnp.einsum("BTNH,BSNH->BNTS", queries, keys)
    return jax.nn.softmax(scores.astype(jnp.float32), axis=-1)


def cubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Weights of PyTorch's 1-D bicubic resize as a matrix.

    Matches `torch.nn.functional.interpolate(mode="bicubic",
    align_corners=False)` and ONNX `Resize(mode="cubic",
    coordinate_transformation_mode="half_pixel", cubic_coeff_a=-0.75)`:
    half-pixel centres, no antialiasing, source indices clamped to the edge.

    Args:
        in_size: length of the input axis.
        out_size: length of the output axis.

    Returns:
        [out_size, in_size] float64 matrix; each row sums to 1.
    """
    targets = np.arange(out_size)
    sources = (targets + 0.5) * (in_size / out_size) - 0.5
    floor = np.floor(sources)
    fraction = sources - floor
    weights = np.zeros((out_size, in_size))
    for offset in (-1, 0, 1, 2):
        index = np.clip(floor + offset, 0, in_size - 1).astype(np.int64)
        np.add.at(weights, (targets, index), _cubic(offset - fraction))
    return weights


def _cubic(distance: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.75."""
    d, a = np.abs(distance), _CUBIC_A
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


def resize_position_grid(table: jax.Array, rows: int, cols: int) -> jax.Array:
    """Resizes a square grid of position embeddings bicubically.

    Args:
        table: [U * V, D] embeddings of a square U x V grid, row-major.
        rows: Y, target grid rows.
        cols: X, target grid columns.

    Returns:
        [Y * X, D] embeddings in float32; `table` itself (as float32) when the
        grid already has the target shape.
    """
    side = math.isqrt(table.shape[0])
    if side * side != table.shape[0]:
        raise ValueError(
            f"table has {table.shape[0]} rows; expected a perfect square."
        )
    table = table.astype(jnp.float32)
    if (side, side) == (rows, cols):
        return table

    row_weights = jnp.asarray(cubic_resize_matrix(side, rows), jnp.float32)
    col_weights = jnp.asarray(cubic_resize_matrix(side, cols), jnp.float32)
    grid = table.reshape(side, side, -1)
    grid = jnp.einsum("YU,UVD->YVD", row_weights, grid)
    grid = jnp.einsum("XV,YVD->YXD", col_weights, grid)
    return grid.reshape(rows * cols, -1)


# ----------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------


class Dense(nnx.Module):
    """Affine projection with an [in, out] `kernel` and a `bias`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        param_dtype: jnp.dtype,
        dtype: jnp.dtype,
        rngs: nnx.Rngs,
    ):
        init = nnx.initializers.normal(_INIT_STDDEV)
        shape = (in_features, out_features)
        self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """Projects [B, T, I] to [B, T, O] in the compute dtype."""
        kernel = self.kernel[...].astype(self.dtype)
        out = jnp.einsum("BTI,IO->BTO", x.astype(self.dtype), kernel)
        return out + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
    """LayerNorm over the width axis with a `scale` and a `bias`."""

    def __init__(self, width: int, *, eps: float, param_dtype: jnp.dtype):
        self.scale = nnx.Param(jnp.ones((width,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((width,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalises [..., D]; returns the dtype of `x`."""
        return layer_norm(x, self.scale[...], self.bias[...], self.eps)


class Attention(nnx.Module):
    """Unmasked multi-head self-attention with biased projections."""

    def __init__(self, config: ViTConfig, **kwargs):
        width = config.width
        self.query = Dense(width, width, **kwargs)
        self.key = Dense(width, width, **kwargs)
        self.value = Dense(width, width, **kwargs)
        self.output = Dense(width, width, **kwargs)
        self.num_heads = config.num_heads

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Attends every token to every token.

        Args:
            x: [B, T, D] normalised tokens.

        Returns:
            [B, T, D] attention output and [B, N, T, S] float32 probabilities
            (S = T).
        """
        batch, tokens, width = x.shape
        heads = (batch, tokens, self.num_heads, width // self.num_heads)
        queries = self.query(x).reshape(heads)
        keys = self.key(x).reshape(heads)
        values = self.value(x).reshape(heads)

        probs = attention_probs(queries, keys)
        mixed = jnp.einsum(
            "BNTS,BSNH->BTNH", probs.astype(values.dtype), values
        )
        return self.output(mixed.reshape(batch, tokens, width)), probs


class Mlp(nnx.Module):
    """Two biased projections with a GELU between them."""

    def __init__(self, config: ViTConfig, **kwargs):
        self.fc1 = Dense(config.width, config.mlp_dim, **kwargs)
        self.fc2 = Dense(config.mlp_dim, config.width, **kwargs)
        self.approximate = config.mlp_activation == "gelu_tanh"

    def __call__(self, x: jax.Array) -> jax.Array:
        """Maps [B, T, D] through [B, T, F] back to [B, T, D]."""
        hidden = jax.nn.gelu(self.fc1(x), approximate=self.approximate)
        return self.fc2(hidden)


class EncoderBlock(nnx.Module):
    """Pre-LayerNorm transformer block with optional layer scale."""

    def __init__(self, config: ViTConfig, *, param_dtype, dtype, rngs):
        kwargs = dict(param_dtype=param_dtype, dtype=dtype, rngs=rngs)
        norm_kwargs = dict(eps=config.layer_norm_eps, param_dtype=param_dtype)
        self.attention_norm = LayerNorm(config.width, **norm_kwargs)
        self.attention = Attention(config, **kwargs)
        self.mlp_norm = LayerNorm(config.width, **norm_kwargs)
        self.mlp = Mlp(config, **kwargs)

        use, ones = config.use_layer_scale, nnx.initializers.ones
        args = (ones, config.width, param_dtype, rngs)
        self.attention_layer_scale = _optional_param(use, *args)
        self.mlp_layer_scale = _optional_param(use, *args)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Maps [B, T, D] tokens to [B, T, D]; also returns [B, N, T, S]."""
        update, probs = self.attention(self.attention_norm(x))
        x = x + _scaled(update, self.attention_layer_scale)
        update = self.mlp(self.mlp_norm(x))
        x = x + _scaled(update, self.mlp_layer_scale)
        return x, probs


def _optional_param(
    present: bool, init, width: int, param_dtype, rngs: nnx.Rngs
) -> nnx.Param | None:
    """A [width] parameter from `init`, or None when not `present`."""
    if not present:
        return None
    return nnx.Param(init(rngs.params(), (width,), param_dtype))


def _scaled(update: jax.Array, layer_scale: nnx.Param | None) -> jax.Array:
    if layer_scale is None:
        return update
    return update * layer_scale[...].astype(update.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VisionEncoding:
    """What `VisionEncoder.encode` returns.

    Attributes:
        features: [B, T, D] tokens after the final norm; T = patches, plus one
            leading class token when the config has one.
        attention: block index -> [B, N, T, S] float32 attention
            probabilities (S = T), for the blocks asked for.
    """

    features: jax.Array
    attention: dict[int, jax.Array]


class VisionEncoder(nnx.Module):
    """ViT image encoder: pixels in, one feature vector per token out.

    Parameter tree: `patch_embedding` (Dense, kernel [C, D]),
    `position_embedding` [num_positions, D], `class_token` and
    `class_position` [D] (or None), `blocks[i]` with `attention_norm`,
    `attention.{query,key,value,output}`, `mlp_norm`, `mlp.{fc1,fc2}`,
    `attention_layer_scale` / `mlp_layer_scale` [D] (or None), and
    `final_norm` (or None).

    >>> from gemma_lab.vision.config import ViTConfig
    >>> config = ViTConfig(image_size=28, patch_size=14, width=8, depth=1,
    ...                    num_heads=2, mlp_dim=16, num_positions=4)
    >>> encoder = VisionEncoder(config, rngs=nnx.Rngs(0))
    >>> encoder(jnp.zeros((1, 28, 28, 3))).shape
    (1, 4, 8)
    """

    def __init__(
        self,
        config: ViTConfig,
        *,
        param_dtype: jnp.dtype = jnp.float32,
        dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        """Builds a randomly initialised encoder.

        Args:
            config: the architecture.
            param_dtype: dtype the parameters are stored in.
            dtype: dtype the activations are computed in.
            rngs: random streams; `rngs.params` initialises the weights.
        """
        self.config = config
        self.dtype = dtype
        width = config.width
        self.patch_embedding = Dense(
            config.patch_dim,
            width,
            param_dtype=param_dtype,
            dtype=dtype,
            rngs=rngs,
        )
        init = nnx.initializers.normal(_INIT_STDDEV)
        shape = (config.num_positions, width)
        self.position_embedding = nnx.Param(
            init(rngs.params(), shape, param_dtype)
        )

        # Attributes that hold parameters are assigned once: with a
        # parameter, or with None when the config has no such parameter.
        has_class = config.use_class_token
        self.class_token = _optional_param(
            has_class, init, width, param_dtype, rngs
        )
        self.class_position = _optional_param(
            has_class, init, width, param_dtype, rngs
        )

        self.blocks = nnx.List(
            EncoderBlock(
                config, param_dtype=param_dtype, dtype=dtype, rngs=rngs
            )
            for _ in range(config.depth)
        )
        self.final_norm = (
            LayerNorm(width, eps=config.layer_norm_eps, param_dtype=param_dtype)
            if config.use_final_norm
            else None
        )

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Encodes images; see `encode`.

        Args:
            pixels: [B, height, width, 3] preprocessed images (see
                `gemma_lab.vision.preprocess`); height and width multiples of
                `patch_size`, usually `image_size`.

        Returns:
            [B, T, D] features in the compute dtype.
        """
        return self.encode(pixels).features

    def encode(
        self, pixels: jax.Array, *, attention_layers: Sequence[int] = ()
    ) -> VisionEncoding:
        """Encodes images and optionally returns attention probabilities.

        Args:
            pixels: [B, height, width, 3] preprocessed images; height and
                width multiples of `patch_size`.
            attention_layers: indices of the blocks (0 .. depth - 1) whose
                attention probabilities to return. Under `nnx.jit`, pass it
                as a static argument.

        Returns:
            A `VisionEncoding` with [B, T, D] features and a dict of
            [B, N, T, T] probabilities keyed by block index.

        Raises:
            ValueError: on a wrongly shaped `pixels` or an out-of-range
                `attention_layers` entry.
        """
        rows, cols = self._check_pixels(pixels)
        wanted = self._check_layers(attention_layers)

        # 1. Patches become tokens, plus their (resized) position embedding.
        patches = patchify(pixels.astype(self.dtype), self.config.patch_size)
        tokens = self.patch_embedding(patches)
        positions = resize_position_grid(
            self.position_embedding[...], rows, cols
        )
        tokens = tokens + positions.astype(self.dtype)

        # 2. The class token, with its own position, goes in front.
        if self.class_token is not None:
            token = self.class_token[...] + self.class_position[...]
            token = jnp.broadcast_to(
                token.astype(self.dtype), tokens[:, :1].shape
            )
            tokens = jnp.concatenate([token, tokens], axis=1)

        # 3. Transformer blocks, keeping the probabilities asked for.
        attention = {}
        for index, block in enumerate(self.blocks):
            tokens, probs = block(tokens)
            if index in wanted:
                attention[index] = probs

        # 4. Final norm.
        if self.final_norm is not None:
            tokens = self.final_norm(tokens)
        return VisionEncoding(features=tokens, attention=attention)

    def _check_pixels(self, pixels: jax.Array) -> tuple[int, int]:
        patch = self.config.patch_size
        shape = getattr(pixels, "shape", None)
        if shape is None or len(shape) != 4 or shape[-1] != 3:
            raise ValueError(
                f"pixels has shape {shape}; expected [B, height, width, 3]."
            )
        if shape[1] % patch or shape[2] % patch:
            raise ValueError(
                f"pixels has shape {shape}; height and width must be "
                f"multiples of patch_size={patch}."
            )
        return shape[1] // patch, shape[2] // patch

    def _check_layers(self, attention_layers: Sequence[int]) -> set[int]:
        depth = self.config.depth
        for layer in attention_layers:
            if not isinstance(layer, int) or not 0 <= layer < depth:
                raise ValueError(
                    f"attention_layers contains {layer!r}; expected block "
                    f"indices in [0, {depth})."
                )
        return set(attention_layers)
