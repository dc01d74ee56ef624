"""ViT image encoders (SigLIP, DINOv2), preprocessing, projector, layout."""

from gemma_lab.vision.config import (
    DINOV2_SMALL_224,
    SIGLIP_SO400M_896,
    ViTConfig,
)
from gemma_lab.vision.encoder import VisionEncoder, VisionEncoding
from gemma_lab.vision.layout import (
    IMAGE_MARKER,
    ImageLayout,
    LayoutBatch,
    batch_layouts,
    expand_images,
    groups_from_soft_mask,
    place_soft_tokens,
)
from gemma_lab.vision.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess_images,
)
from gemma_lab.vision.projector import MultimodalProjector, avg_pool_tokens

__all__ = [
    "DINOV2_SMALL_224",
    "IMAGE_MARKER",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageLayout",
    "LayoutBatch",
    "MultimodalProjector",
    "SIGLIP_SO400M_896",
    "ViTConfig",
    "VisionEncoder",
    "VisionEncoding",
    "avg_pool_tokens",
    "batch_layouts",
    "expand_images",
    "groups_from_soft_mask",
    "place_soft_tokens",
    "preprocess_images",
]
