"""Architecture settings of a ViT image encoder, and one preset per encoder.

A `ViTConfig` describes a Vision Transformer (Dosovitskiy et al., 2021) as
used by Gemma 3 (SigLIP, Zhai et al., 2023) and by DINOv2 (Oquab et al.,
2023). The image is cut into a grid of square *patches*; each patch becomes
one *token*. Some encoders prepend a learned *class token* that reads the
whole image. Every patch token gets a learned *position embedding* from a
square grid of `num_positions` entries; when the patch grid of the input
differs from that stored grid, the encoder resizes the table bicubically
(DINOv2 stores a 37 x 37 grid, learned at 518 px, and runs at 224 px here).

Blocks are pre-LayerNorm: `x + attn(norm(x))`, then `x + mlp(norm(x))`,
optionally with a learned per-channel *layer scale* on each branch (DINOv2).
Dtypes are not part of the config; they are chosen when the encoder is built.
"""

from __future__ import annotations

import dataclasses
import math

MLP_ACTIVATIONS = ("gelu_tanh", "gelu")
_POSITIVE_FIELDS = (
    "image_size",
    "patch_size",
    "width",
    "depth",
    "num_heads",
    "mlp_dim",
    "num_positions",
)


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Architecture of a ViT image encoder.

    Attributes:
        image_size: side of the square input image in pixels.
        patch_size: side of a square patch in pixels.
        width: D, the token width.
        depth: number of transformer blocks.
        num_heads: N, attention heads per block.
        mlp_dim: F, hidden width of each block's MLP.
        num_positions: entries in the learned position table of the patch
            tokens; a perfect square. It may differ from the number of
            patches at `image_size`, in which case the table is resized.
        layer_norm_eps: epsilon of every LayerNorm.
        use_class_token: whether a learned class token (with its own
            position embedding) is prepended to the patch tokens.
        use_layer_scale: whether each residual branch is multiplied by a
            learned per-channel scale before it is added.
        mlp_activation: "gelu_tanh" (tanh approximation, SigLIP) or "gelu"
            (exact, erf-based, DINOv2).
        use_final_norm: whether a LayerNorm follows the last block.
    """

    image_size: int
    patch_size: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    num_positions: int
    layer_norm_eps: float = 1e-6
    use_class_token: bool = False
    use_layer_scale: bool = False
    mlp_activation: str = "gelu_tanh"
    use_final_norm: bool = True

    def __post_init__(self):
        for name in _POSITIVE_FIELDS:
            _check_positive(name, getattr(self, name))
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} must be a multiple of "
                f"patch_size={self.patch_size}."
            )
        if self.width % self.num_heads:
            raise ValueError(
                f"width={self.width} must be a multiple of "
                f"num_heads={self.num_heads}."
            )
        if math.isqrt(self.num_positions) ** 2 != self.num_positions:
            raise ValueError(
                f"num_positions={self.num_positions} must be a perfect "
                "square (a square grid of position embeddings)."
            )
        if self.mlp_activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"mlp_activation={self.mlp_activation!r}; expected one of "
                f"{MLP_ACTIVATIONS}."
            )

    @property
    def head_dim(self) -> int:
        """H, the width of one attention head."""
        return self.width // self.num_heads

    @property
    def patch_grid(self) -> int:
        """Patches along each side of an `image_size` image."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens of an `image_size` image."""
        return self.patch_grid**2

    @property
    def num_tokens(self) -> int:
        """T, tokens of an `image_size` image, class token included."""
        return self.num_patches + int(self.use_class_token)

    @property
    def position_grid(self) -> int:
        """Side of the square grid of stored position embeddings."""
        return math.isqrt(self.num_positions)

    @property
    def patch_dim(self) -> int:
        """C, values in one flattened RGB patch (patch_size² × 3)."""
        return self.patch_size * self.patch_size * 3


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}={value!r}; expected a positive integer.")


# Gemma 3's image encoder: SigLIP So400m/14 at 896 px, without the attention
# pooling head. 64 x 64 patches, one position embedding per patch.
SIGLIP_SO400M_896 = ViTConfig(
    image_size=896,
    patch_size=14,
    width=1152,
    depth=27,
    num_heads=16,
    mlp_dim=4304,
    num_positions=4096,
    layer_norm_eps=1e-6,
    use_class_token=False,
    use_layer_scale=False,
    mlp_activation="gelu_tanh",
    use_final_norm=True,
)

# DINOv2 ViT-S/14 run at 224 px (16 x 16 patches). Its position table was
# learned at 518 px (37 x 37 = 1369 entries) and is resized bicubically.
DINOV2_SMALL_224 = ViTConfig(
    image_size=224,
    patch_size=14,
    width=384,
    depth=12,
    num_heads=6,
    mlp_dim=1536,
    num_positions=1369,
    layer_norm_eps=1e-6,
    use_class_token=True,
    use_layer_scale=True,
    mlp_activation="gelu",
    use_final_norm=True,
)
