"""Matplotlib figures for gemma_lab notebooks: one helper per visualisation.

Every helper returns a `matplotlib.figure.Figure` (closed in pyplot, so a
notebook shows it once, as the cell's value) or draws into a given `Axes`.
Attention maps put queries on the y axis and keys on the x axis, labelled
with token strings from `token_labels`; titles name the layer and the head.
When a sequence is long, only every k-th token is labelled.

Attention helpers:
    plot_head         one head's map [T, S] (optionally on a log scale, where
                      masked keys, exactly 0, show in the background colour)
    plot_heads        chosen (layer, head) maps of a `Capture`, side by side
    plot_layer        every head of one layer as a grid
Analysis helpers:
    plot_head_scores  a layers x heads heatmap of a `HeadScores`
    plot_logit_lens   the top tokens read out after each layer
    plot_ablation     the loss rise caused by ablating each head
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
from matplotlib import font_manager, ft2font
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from gemma_lab.analysis import Ablation, HeadScores, LogitLens
from gemma_lab.capture import Capture
from gemma_lab.config import TransformerConfig

_LOG_FLOOR = 1e-4
_CMAP = "viridis"


def token_labels(
    tokenizer, ids: Sequence[int], *, max_chars: int = 12
) -> list[str]:
    """Readable token strings for axis labels.

    SentencePiece's word marker becomes a space; control characters and
    characters the plotting font cannot draw are written as escapes (\\n,
    \\u0995), so every label stays on one line and shows no empty boxes.
    Labels longer than `max_chars` are cut with an ellipsis.

    Args:
        tokenizer: anything with `id_to_piece(int) -> str`.
        ids: token ids (a list, or an array of any shape, read flat).
        max_chars: the longest label kept whole.
    """
    labels = []
    for i in np.asarray(ids).reshape(-1):
        piece = tokenizer.id_to_piece(int(i)).replace("\u2581", " ")
        label = "".join(_drawable(char) for char in piece)
        if len(label) > max_chars:
            label = label[: max_chars - 1] + "\u2026"
        labels.append(label)
    return labels


@functools.lru_cache(maxsize=1)
def _default_font() -> ft2font.FT2Font:
    return ft2font.FT2Font(font_manager.findfont(font_manager.FontProperties()))


def _drawable(char: str) -> str:
    """The character when the default font can draw it, else an escape."""
    if char.isprintable() and _default_font().get_char_index(ord(char)):
        return char
    return char.encode("unicode_escape").decode("ascii")


def head_title(
    layer: int, head: int, config: TransformerConfig | None = None
) -> str:
    """'layer L, head H', plus the attention kind when a config is given."""
    title = f"layer {layer}, head {head}"
    if config is None:
        return title
    if layer in config.global_layers:
        return f"{title} (global)"
    return f"{title} (local, W={config.sliding_window})"


def _set_ticks(ax: Axes, labels: Sequence[str], axis: str, max_ticks: int):
    step = max(1, math.ceil(len(labels) / max_ticks))
    where = np.arange(0, len(labels), step)
    shown = [f"{labels[i]} [{i}]" if step > 1 else labels[i] for i in where]
    if axis == "x":
        ax.set_xticks(where, shown, rotation=90, fontsize=7)
    else:
        ax.set_yticks(where, shown, fontsize=7)


def plot_head(
    probs: np.ndarray,
    tokens: Sequence[str],
    *,
    layer: int,
    head: int,
    ax: Axes | None = None,
    log: bool = False,
    config: TransformerConfig | None = None,
    max_ticks: int = 40,
) -> Axes:
    """Draws one head's attention map, queries down, keys across.

    Args:
        probs: [T, S] probabilities of one head (e.g. `Capture.probs`).
        tokens: S token strings; the last T also label the queries.
        layer: layer index, for the title.
        head: head index, for the title.
        ax: axes to draw into; a new figure when None.
        log: log colour scale from 1e-4 to 1; exact zeros (masked keys) are
            left blank, which shows the causal and sliding-window masks.
        config: adds local/global to the title when given.
        max_ticks: at most this many labels per axis.

    Returns:
        The axes drawn into.
    """
    probs = np.asarray(probs)
    if probs.ndim != 2 or len(tokens) != probs.shape[1]:
        raise ValueError(
            f"probs must be [T, S] with S == len(tokens)={len(tokens)}, "
            f"got shape {probs.shape}"
        )
    if ax is None:
        fig, ax = plt.subplots(figsize=(5, 5))
        plt.close(fig)
    norm = None
    if log:
        norm = matplotlib.colors.LogNorm(vmin=_LOG_FLOOR, vmax=1.0, clip=True)
        probs = np.ma.masked_equal(probs, 0.0)
    image = ax.imshow(probs, cmap=_CMAP, norm=norm, interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    _set_ticks(ax, tokens, "x", max_ticks)
    _set_ticks(ax, tokens[-probs.shape[0] :], "y", max_ticks)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(head_title(layer, head, config))
    return ax


def _grid(count: int, ncols: int, size: float) -> tuple[Figure, list[Axes]]:
    ncols = max(1, min(ncols, count))
    nrows = math.ceil(count / ncols)
    fig, axes = plt.subplots(
        nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False
    )
    plt.close(fig)
    axes = list(axes.reshape(-1))
    for ax in axes[count:]:
        ax.set_axis_off()
    return fig, axes[:count]


def plot_heads(
    cap: Capture,
    heads: Sequence[tuple[int, int]],
    tokens: Sequence[str],
    *,
    row: int = 0,
    ncols: int = 4,
    size: float = 5.0,
    **kwargs,
) -> Figure:
    """Draws chosen heads of a capture side by side.

    Args:
        cap: a capture holding every layer named in `heads`.
        heads: (layer, head) pairs, drawn left to right.
        tokens: token strings of the captured sequence.
        row: batch row.
        ncols: panels per row.
        size: inches per panel.
        **kwargs: passed to `plot_head` (log, config, max_ticks).
    """
    if not heads:
        raise ValueError("heads must name at least one (layer, head), got []")
    fig, axes = _grid(len(heads), ncols, size)
    for ax, (layer, head) in zip(axes, heads, strict=True):
        probs = cap.probs(layer, head, row)
        plot_head(probs, tokens, layer=layer, head=head, ax=ax, **kwargs)
    fig.tight_layout()
    return fig


def plot_layer(
    cap: Capture, layer: int, tokens: Sequence[str], **kwargs
) -> Figure:
    """Draws every head of one captured layer as a grid (see `plot_heads`)."""
    num_heads = cap.layer_probs(layer, kwargs.get("row", 0)).shape[0]
    heads = [(layer, head) for head in range(num_heads)]
    return plot_heads(cap, heads, tokens, **kwargs)


def plot_head_scores(
    scores: HeadScores,
    *,
    config: TransformerConfig | None = None,
    annotate: bool = True,
) -> Figure:
    """Draws a per-head score as a layers x heads heatmap.

    Args:
        scores: e.g. `analysis.induction_scores(...)`.
        config: marks the global layers in the row labels when given.
        annotate: write each value in its cell.
    """
    values = np.asarray(scores.values)
    rows, cols = values.shape
    fig, ax = plt.subplots(figsize=(1.0 * cols + 2.5, 0.32 * rows + 1.5))
    plt.close(fig)
    image = ax.imshow(values, cmap=_CMAP, aspect="auto")
    fig.colorbar(image, ax=ax)

    globals_ = () if config is None else config.global_layers
    names = [
        f"{i} (global)" if i in globals_ else str(i) for i in scores.layers
    ]
    ax.set_yticks(np.arange(rows), names, fontsize=8)
    ax.set_xticks(np.arange(cols), [str(h) for h in range(cols)])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{scores.name} per head")
    if annotate:
        _annotate(ax, values, [[f"{v:.2f}" for v in r] for r in values])
    return fig


def _annotate(
    ax: Axes,
    values: np.ndarray,
    texts: Sequence[Sequence[str]],
    middle: float | None = None,
):
    """Writes texts over a heatmap, dark on light cells and light on dark."""
    if middle is None:
        middle = (np.nanmax(values) + np.nanmin(values)) / 2
    for (r, c), value in np.ndenumerate(values):
        color = "black" if value > middle else "white"
        ax.text(
            c, r, texts[r][c], ha="center", va="center", fontsize=7, color=color
        )


def plot_logit_lens(lens: LogitLens, tokenizer) -> Figure:
    """Draws the logit lens: a row per layer, its top tokens by probability.

    Args:
        lens: from `analysis.logit_lens`.
        tokenizer: anything with `id_to_piece(int) -> str`.
    """
    rows, top_k = lens.token_ids.shape
    fig, ax = plt.subplots(figsize=(1.7 * top_k + 2.0, 0.32 * rows + 1.5))
    plt.close(fig)
    image = ax.imshow(lens.probs, cmap=_CMAP, vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, label="probability")

    texts = [token_labels(tokenizer, ids) for ids in lens.token_ids]
    _annotate(ax, lens.probs, texts, middle=0.5)
    ax.set_yticks(np.arange(rows), [str(i) for i in lens.layers], fontsize=8)
    ax.set_xticks(np.arange(top_k), [f"top {k + 1}" for k in range(top_k)])
    ax.set_ylabel("layer (residual stream after it)")
    ax.set_title(f"logit lens at position {lens.position}")
    return fig


def plot_ablation(ablation: Ablation) -> Figure:
    """Draws the loss rise caused by ablating each head, one bar per head."""
    labels = [f"L{layer} H{head}" for layer, head in ablation.heads]
    fig, ax = plt.subplots(figsize=(0.9 * len(labels) + 2.0, 3.5))
    plt.close(fig)
    ax.bar(np.arange(len(labels)), ablation.increase, color="tab:blue")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=45)
    ax.set_ylabel("loss rise (nats)")
    ax.set_title(
        f"one head ablated: loss on positions >= {ablation.start} "
        f"(baseline {ablation.baseline:.3f})"
    )
    fig.tight_layout()
    return fig
