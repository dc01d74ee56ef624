"""An interactive attention explorer and treescope views of a model.

`AttentionExplorer` is a widget built from core ipywidgets only: a layer
slider, a head slider and a token selector above an image of the chosen
head's map (the selected query's row marked) and the text coloured by where
that token attends. The image is a PNG held by the widget and the text is
HTML with inline styles, so nothing is fetched from the network: the notebook
front end (JupyterLab, Notebook 7, VS Code, Colab) draws the widgets with its
own bundled code. Redraws run in the Python kernel; without a front end (a
script, a headless test run) the widget still builds and updates.

`model_view` renders a model, or only its parameters, with treescope as
self-contained HTML (its scripts are inline, none is loaded from a CDN).
"""

from __future__ import annotations

import html
import io
from collections.abc import Sequence

import ipywidgets
import numpy as np
import treescope
from flax import nnx
from IPython.display import HTML

from gemma_lab.capture import Capture
from gemma_lab.config import TransformerConfig
from gemma_lab.plotting import plot_head

_HIGHLIGHT = "68, 1, 84"  # The dark end of viridis, as in the heatmaps.


def attention_html(
    tokens: Sequence[str], weights: np.ndarray, *, query: int
) -> str:
    """The tokens as HTML, each shaded by the attention it receives.

    Args:
        tokens: S token strings.
        weights: [S] attention of one query over the keys.
        query: index of the attending token, drawn with a red outline.

    Returns:
        An HTML fragment with inline styles only (no scripts, no links).
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(tokens),) or not 0 <= query < len(tokens):
        raise ValueError(
            f"need weights of shape ({len(tokens)},) and query in "
            f"[0, {len(tokens)}), got {weights.shape} and {query}"
        )
    peak = max(float(weights.max()), 1e-12)
    spans = []
    for i, (token, weight) in enumerate(zip(tokens, weights, strict=True)):
        alpha = float(weight) / peak
        style = f"background: rgba({_HIGHLIGHT}, {alpha:.3f});"
        style += " color: white;" if alpha > 0.5 else ""
        if i == query:
            style += " outline: 2px solid red;"
        title = f"key {i}: {weight:.4f}"
        spans.append(
            f'<span style="{style}" title="{title}">{html.escape(token)}</span>'
        )
    body = "".join(spans)
    return f'<div style="font-family: monospace; line-height: 1.8">{body}</div>'


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80, bbox_inches="tight")
    return buffer.getvalue()


class AttentionExplorer(ipywidgets.VBox):
    """Layer and head sliders, a token selector, the map and the text.

    Args:
        cap: a cache-free capture (key s is position s).
        tokens: T token strings (see `plotting.token_labels`).
        row: batch row to show.
        config: adds local/global to the map's title when given.

    Attributes:
        layer: slider over the captured layers.
        head: slider over the heads.
        query: the attending token.
        image: the head's attention map, the query's row marked.
        text: the tokens shaded by the query's attention.
    """

    def __init__(
        self,
        cap: Capture,
        tokens: Sequence[str],
        *,
        row: int = 0,
        config: TransformerConfig | None = None,
    ):
        super().__init__()
        num_heads, t, s = cap.layer_probs(cap.layers[0], row).shape
        if len(tokens) != s or t != s:
            raise ValueError(
                f"tokens must hold one string per key ({s}) of a cache-free "
                f"capture (T == S), got {len(tokens)} tokens and T={t}"
            )
        self._cap, self._tokens = cap, list(tokens)
        self._row, self._config = row, config

        self.layer = ipywidgets.SelectionSlider(
            options=cap.layers, value=cap.layers[0], description="layer"
        )
        self.head = ipywidgets.IntSlider(
            value=0, min=0, max=num_heads - 1, description="head"
        )
        labels = [(f"{i}: {tok}", i) for i, tok in enumerate(self._tokens)]
        self.query = ipywidgets.Dropdown(
            options=labels, value=t - 1, description="token"
        )
        self.image = ipywidgets.Image(format="png")
        self.text = ipywidgets.HTML()
        for control in (self.layer, self.head, self.query):
            control.observe(self._redraw, names="value")

        controls = ipywidgets.HBox([self.layer, self.head, self.query])
        self.children = [controls, self.image, self.text]
        self._redraw()

    def weights(self) -> np.ndarray:
        """[S] attention of the selected query in the selected head."""
        probs = self._cap.probs(self.layer.value, self.head.value, self._row)
        return probs[self.query.value]

    def _redraw(self, change=None):
        del change
        layer, head, query = self.layer.value, self.head.value, self.query.value
        probs = self._cap.probs(layer, head, self._row)
        ax = plot_head(
            probs,
            self._tokens,
            layer=layer,
            head=head,
            log=True,
            config=self._config,
        )
        ax.axhline(query, color="red", linewidth=0.8)
        self.image.value = _png(ax.figure)
        self.text.value = attention_html(
            self._tokens, probs[query], query=query
        )


def model_view(model: nnx.Module, *, params_only: bool = False) -> HTML:
    """A treescope rendering of a model, or only of its parameters.

    Args:
        model: any NNX module, e.g. the `Transformer`.
        params_only: render `nnx.state(model, nnx.Param)` (the parameter
            tree with shapes and dtypes) instead of the module.

    Returns:
        An `IPython.display.HTML` holding self-contained treescope HTML.
    """
    if not isinstance(model, nnx.Module):
        raise TypeError(
            f"model must be an nnx.Module, got {type(model).__name__}"
        )
    value = nnx.state(model, nnx.Param) if params_only else model
    return HTML(treescope.render_to_html(value))
