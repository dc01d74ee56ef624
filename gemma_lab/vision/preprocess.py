"""Turning images into the pixel arrays a `VisionEncoder` expects.

`preprocess_images` takes PIL images or numpy arrays of any size, converts
them to RGB, resizes each to a square `size` x `size` with PIL's bilinear
filter (antialiased when shrinking), and scales the values:

* SigLIP mode (Gemma 3, the default): [0, 255] -> [-1, 1], i.e. mean 0.5 and
  std 0.5 on the [0, 1] scale, as in HF's `Gemma3ImageProcessor`.
* ImageNet mode (DINOv2): pass `mean=IMAGENET_MEAN, std=IMAGENET_STD`.

Arrays may be uint8 in [0, 255] or floating point in [0, 1]; grayscale
([H, W] or [H, W, 1]) is repeated over three channels; RGBA is composited
onto a white background, as HF's `convert_to_rgb` does. The result is a
float32 [B, size, size, 3] batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Float inputs are expected in [0, 1]; this slack absorbs rounding noise.
_FLOAT_SLACK = 1e-3


def preprocess_images(
    images,
    *,
    size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """Converts, resizes and normalises images into one batch.

    Args:
        images: one image or a sequence of images; each a PIL image or a
            numpy array of shape [H, W], [H, W, 1], [H, W, 3] or [H, W, 4],
            uint8 in [0, 255] or floating point in [0, 1]. A 4-D array is
            read as a batch. Sizes may differ between images.
        size: side of the square output images in pixels.
        mean: per-channel mean on the [0, 1] scale; default 0.5 (SigLIP).
        std: per-channel standard deviation on the [0, 1] scale; default 0.5.

    Returns:
        [B, size, size, 3] float32 array, (value / 255 - mean) / std.

    Raises:
        ValueError: on a bad `size`, `mean` or `std`, an empty batch, an
            array of the wrong shape, or float values outside [0, 1].
        TypeError: on an image that is neither PIL nor numpy, or an array
            of an unsupported dtype.

    >>> white = np.full((5, 7, 3), 255, np.uint8)
    >>> preprocess_images([white], size=4).shape
    (1, 4, 4, 3)
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size={size!r}; expected a positive integer.")
    mean, std = _check_stats(mean, std)
    batch = _as_list(images)
    if not batch:
        raise ValueError("images is empty; expected at least one image.")

    resized = [
        _resize_rgb(image, size, index) for index, image in enumerate(batch)
    ]
    pixels = np.stack(resized).astype(np.float32)
    return ((pixels - mean) / std).astype(np.float32)


def _check_stats(mean, std) -> tuple[np.ndarray, np.ndarray]:
    if (mean is None) != (std is None):
        raise ValueError(f"mean={mean!r}, std={std!r}; pass both or neither.")
    mean = np.asarray(SIGLIP_MEAN if mean is None else mean, np.float32)
    std = np.asarray(SIGLIP_STD if std is None else std, np.float32)
    if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
        raise ValueError(
            f"mean={mean.tolist()}, std={std.tolist()}; expected three "
            "values each, std positive."
        )
    return mean, std


def _as_list(images) -> list:
    if isinstance(images, Image.Image):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    if isinstance(images, Sequence) and not isinstance(images, str):
        return list(images)
    raise TypeError(
        f"images is a {type(images).__name__}; expected a PIL image, a numpy "
        "array or a sequence of them."
    )


def _resize_rgb(image, size: int, index: int) -> np.ndarray:
    """One image as a [size, size, 3] float array on the [0, 1] scale."""
    if isinstance(image, Image.Image):
        return _resize_uint8(_pil_to_rgb(image), size)
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"images[{index}] is a {type(image).__name__}; expected a PIL "
            "image or a numpy array."
        )

    array = _as_hwc(image, index)
    if array.dtype == np.uint8:
        return _resize_uint8(_pil_to_rgb(Image.fromarray(array)), size)
    if not np.issubdtype(array.dtype, np.floating):
        raise TypeError(
            f"images[{index}] has dtype {array.dtype}; expected uint8 in "
            "[0, 255] or floating point in [0, 1]."
        )
    return _resize_float(_float_to_rgb(array, index), size)


def _as_hwc(array: np.ndarray, index: int) -> np.ndarray:
    """[H, W] or [H, W, C] with C in (1, 3, 4), as [H, W] or [H, W, 3|4]."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
        if min(array.shape[:2]) > 0:
            return array
    raise ValueError(
        f"images[{index}] has shape {array.shape}; expected [H, W] "
        "(grayscale), [H, W, 1], [H, W, 3] (RGB) or [H, W, 4] (RGBA)."
    )


def _pil_to_rgb(image: Image.Image) -> Image.Image:
    """RGB image; transparency is composited onto white."""
    if image.mode == "RGB":
        return image
    rgba = image.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _resize_uint8(image: Image.Image, size: int) -> np.ndarray:
    resized = image.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.float32) / 255.0


def _float_to_rgb(array: np.ndarray, index: int) -> np.ndarray:
    """[H, W, 3] float32 from a float gray, RGB or RGBA array in [0, 1]."""
    array = array.astype(np.float32)
    low, high = float(array.min()), float(array.max())
    if low < -_FLOAT_SLACK or high > 1 + _FLOAT_SLACK:
        raise ValueError(
            f"images[{index}] is floating point with values in [{low:.4g}, "
            f"{high:.4g}]; expected [0, 1] (use uint8 for [0, 255])."
        )
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=-1)
    if array.shape[-1] == 4:
        alpha = array[..., 3:]
        return array[..., :3] * alpha + (1.0 - alpha)
    return array


def _resize_float(array: np.ndarray, size: int) -> np.ndarray:
    """Resizes each channel in PIL's 32-bit float mode, without rounding."""
    channels = [
        Image.fromarray(np.ascontiguousarray(array[..., c])) for c in range(3)
    ]
    resized = [
        np.asarray(ch.resize((size, size), Image.Resampling.BILINEAR))
        for ch in channels
    ]
    return np.stack(resized, axis=-1)
