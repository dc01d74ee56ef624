"""Matplotlib figures for the vision notebooks: one helper per visualisation.

Every helper returns a `matplotlib.figure.Figure`, closed in pyplot so a
notebook shows it once, as the cell's value.

    plot_image_layout      a prompt's expanded token sequence, coloured by
                           kind (text, image marker, soft position), above
                           its attention mask (query rows, key columns)
    plot_image_attention   attention over an image's soft tokens (a square
                           grid of weights) as a heatmap laid over the image
    plot_photo_attention   several images, each with its own heatmap
    plot_answers           images with their question, the model's answer
                           and the expected one (green when they agree)

A *heatmap over an image* stretches the [side, side] grid of weights to the
image's pixels bilinearly, so each cell covers the patches it pooled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from PIL import Image

from gemma_lab.data_vqa import final_answer

_TEXT, _MARKER, _SOFT = 0, 1, 2
_KIND_COLOURS = ("#d9d9d9", "#fdae61", "#2c7bb6")
_CMAP = "inferno"


def _finish(fig: Figure) -> Figure:
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_image_layout(
    labels: Sequence[str],
    soft_mask: np.ndarray,
    mask: np.ndarray,
    *,
    marker_ids: Sequence[bool] | None = None,
    title: str = "expanded prompt and attention mask",
) -> Figure:
    """Draws an expanded prompt and which keys each query may attend to.

    Args:
        labels: T token strings (see `gemma_lab.plotting.token_labels`).
        soft_mask: [T] bool, True at soft positions.
        mask: [T, T] bool, True where query (row) may attend to key (column).
        marker_ids: [T] bool, True at `<start_of_image>`/`<end_of_image>`.
        title: figure title.

    Returns:
        A figure: a strip of token kinds over the mask matrix.
    """
    soft_mask = np.asarray(soft_mask, bool)
    kinds = np.where(soft_mask, _SOFT, _TEXT)
    if marker_ids is not None:
        kinds = np.where(np.asarray(marker_ids, bool), _MARKER, kinds)

    fig, (strip, grid) = plt.subplots(
        2,
        1,
        figsize=(9, 9.6),
        sharex=True,
        gridspec_kw={"height_ratios": [1, 14]},
    )
    cmap = matplotlib.colors.ListedColormap(_KIND_COLOURS)
    strip.imshow(kinds[None], cmap=cmap, vmin=0, vmax=2, aspect="auto")
    strip.set_yticks([])
    strip.set_title(
        f"{title}\ngrey: text, orange: image markers, blue: soft tokens",
        fontsize=9,
    )

    grid.imshow(
        np.asarray(mask, bool),
        cmap="Greys",
        interpolation="none",
        aspect="auto",
    )
    ticks = np.arange(len(labels))
    grid.set_xticks(ticks, labels, rotation=90, fontsize=6)
    grid.set_yticks(ticks, labels, fontsize=6)
    grid.set_xlabel("key")
    grid.set_ylabel("query")
    return _finish(fig)


def _overlay(
    ax: Axes, image: np.ndarray, weights: np.ndarray, title: str
) -> None:
    """Draws `image` and a [side, side] heatmap stretched over it."""
    image = np.asarray(image)
    height, width = image.shape[:2]
    heat = Image.fromarray(np.asarray(weights, np.float32))
    heat = np.asarray(heat.resize((width, height), Image.Resampling.BILINEAR))
    ax.imshow(image)
    ax.imshow(heat, cmap=_CMAP, alpha=0.55)
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_image_attention(
    image: np.ndarray, weights: np.ndarray, *, title: str
) -> Figure:
    """The image beside the same image under its attention heatmap.

    Args:
        image: [H, W, 3] uint8 image.
        weights: [side, side] attention weights over the soft tokens in
            row-major grid order.
        title: names the layer(s) and head(s) the weights come from.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(6.4, 3.4))
    left.imshow(np.asarray(image))
    left.set_title("image", fontsize=8)
    left.axis("off")
    _overlay(right, image, weights, title)
    return _finish(fig)


def plot_photo_attention(
    images: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    titles: Sequence[str],
    *,
    ncols: int = 3,
) -> Figure:
    """Several images, each under its own [side, side] heatmap."""
    count = len(images)
    nrows = math.ceil(count / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.3 * ncols, 3.3 * nrows), squeeze=False
    )
    for ax in axes.ravel()[count:]:
        ax.axis("off")
    for ax, image, heat, title in zip(
        axes.ravel(), images, weights, titles, strict=False
    ):
        _overlay(ax, image, heat, title)
    return _finish(fig)


def plot_answers(
    images: Sequence[np.ndarray],
    questions: Sequence[str],
    predicted: Sequence[str],
    expected: Sequence[str],
    *,
    ncols: int = 4,
) -> Figure:
    """Images with question, reply and expected answer as the title.

    A title is green when the reply's answer (after any rationale, see
    `data_vqa.final_answer`) is the expected one, red otherwise.
    """
    count = len(images)
    nrows = math.ceil(count / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(3.0 * ncols, 3.2 * nrows), squeeze=False
    )
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, question, got, want in zip(
        axes.ravel(), images, questions, predicted, expected, strict=False
    ):
        ax.imshow(np.asarray(image))
        good = final_answer(got).lower() == want.strip().lower()
        ax.set_title(
            f"{question}\nmodel: {got}  (expected: {want})",
            fontsize=7,
            color="green" if good else "red",
        )
    return _finish(fig)
