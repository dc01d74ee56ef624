"""ViT image encoders: Gemma 3's SigLIP and DINOv2, with preprocessing."""

from gemma_lab.vision.config import (
    DINOV2_SMALL_224,
    SIGLIP_SO400M_896,
    ViTConfig,
)
from gemma_lab.vision.encoder import VisionEncoder, VisionEncoding
from gemma_lab.vision.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess_images,
)

__all__ = [
    "DINOV2_SMALL_224",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SIGLIP_SO400M_896",
    "ViTConfig",
    "VisionEncoder",
    "VisionEncoding",
    "preprocess_images",
]
