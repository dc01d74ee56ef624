"""The bridge from vision features to the language model: pool, norm, project.

Gemma 3 turns the 4096 patch features of one 896 px image (a 64 x 64 grid,
width 1152) into 256 *soft tokens*: the grid is average-pooled in 4 x 4
windows to 16 x 16, each pooled feature goes through an RMSNorm (the
reference's `mm_soft_emb_norm`, scale stored as offset from 1) and a
bias-free linear *projection* into the text width D. Soft tokens replace the
token embeddings at the image's placeholder positions and, unlike token
embeddings, are not multiplied by sqrt(D).

Letters: B images, P patch features (a square grid), M soft tokens per image
(a square grid), E vision width, D text width. Pooling follows PyTorch's
`AvgPool2d` on the row-major patch grid, as HF's `Gemma3MultiModalProjector`.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from gemma_lab.layers import Linear, RMSNorm


def grid_side(count: int, *, name: str) -> int:
    """Side of the square grid holding `count` tokens.

    Raises:
        ValueError: if `count` is not a positive perfect square.
    """
    side = math.isqrt(count) if count > 0 else 0
    if side * side != count or side == 0:
        raise ValueError(
            f"{name}={count}; expected a positive perfect square (a square "
            "grid of tokens; drop any class token first)."
        )
    return side


def avg_pool_tokens(
    features: Float[Array, "B P E"], tokens_out: int
) -> Float[Array, "B M E"]:
    """Averages a square grid of tokens in non-overlapping square windows.

    Args:
        features: patch features in row-major grid order, P = side².
        tokens_out: M = out_side², with side a multiple of out_side.

    Returns:
        Pooled features in row-major order; `features` itself when M == P.

    Raises:
        ValueError: if P or M is not a perfect square, or the grid side is
            not a multiple of the pooled side.

    >>> import numpy as np
    >>> avg_pool_tokens(jnp.ones((1, 16, 3)), 4).shape
    (1, 4, 3)
    """
    b, p, e = features.shape
    side = grid_side(p, name="features.shape[1]")
    out_side = grid_side(tokens_out, name="tokens_out")
    if side % out_side:
        raise ValueError(
            f"tokens_out={tokens_out} ({out_side}x{out_side}) does not divide "
            f"the {side}x{side} grid of features.shape[1]={p}; expected a "
            "pooled side that divides the grid side."
        )
    window = side // out_side
    grid = features.reshape(b, out_side, window, out_side, window, e)
    # Mean in float32, as PyTorch's AvgPool2d accumulates.
    pooled = grid.astype(jnp.float32).mean(axis=(2, 4))
    return pooled.reshape(b, tokens_out, e).astype(features.dtype)


class MultimodalProjector(nnx.Module):
    """Pools vision features and maps them to soft tokens of the text width.

    Args:
        vision_width: E, width of the vision features.
        text_width: D, width of the language model.
        tokens_out: M, soft tokens per image (256 in Gemma 3).
        eps: epsilon of the RMSNorm (the vision config's layer_norm_eps).
        rngs: random streams for initialisation; keyword-only.
        param_dtype: dtype of the stored parameters.
        dtype: compute dtype.

    Attributes:
        norm: `RMSNorm` over E, scale as offset from 1.
        projection: `Linear` with kernel [E, D], no bias.

    >>> projector = MultimodalProjector(8, 16, tokens_out=4, rngs=nnx.Rngs(0))
    >>> projector(jnp.ones((2, 16, 8))).shape
    (2, 4, 16)
    """

    def __init__(
        self,
        vision_width: int,
        text_width: int,
        *,
        tokens_out: int = 256,
        eps: float = 1e-6,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ):
        grid_side(tokens_out, name="tokens_out")
        self.tokens_out = tokens_out
        self.norm = RMSNorm(vision_width, eps=eps, param_dtype=param_dtype)
        self.projection = Linear(
            vision_width,
            text_width,
            rngs=rngs,
            param_dtype=param_dtype,
            dtype=dtype,
        )

    def __call__(
        self, features: Float[Array, "B P E"]
    ) -> Float[Array, "B M D"]:
        """Soft tokens: projection(norm(avg_pool_tokens(features)))."""
        width = self.norm.scale.shape[0]
        if features.ndim != 3 or features.shape[-1] != width:
            raise ValueError(
                f"features has shape {features.shape}; expected [B, P, "
                f"{width}] (vision width {width})."
            )
        pooled = avg_pool_tokens(features, self.tokens_out)
        return self.projection(self.norm(pooled))
