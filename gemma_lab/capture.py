"""Attention probabilities and the residual stream of one forward pass.

`capture` runs `Transformer.forward` with its opt-in tap point switched on for
the requested layers and returns a `Capture`: a small frozen dataclass (a JAX
pytree, so it can leave a jitted function) holding

- attention: {layer: probs [B, N, T, S]}, the softmax over keys of every
  query head; rows sum to 1, keys a query may not see hold exactly 0,
- residual: {layer: [B, T, D]}, the residual stream after that layer, i.e.
  before the final norm (the logit lens reads it through the final norm and
  the tied head),
- logits: [B, T, V], or None when they were not asked for.

Layers are counted from 0. Only the requested layers are kept, so memory grows
with len(layers) * B * N * T * S; for the 270M (N = 4) one layer at T = 600 is
about 6 MB of float32 probabilities. Without a KV cache S == T and key s is
the token at position s.

>>> import jax.numpy as jnp
>>> from gemma_lab import testing
>>> model = testing.tiny_model()
>>> cap = capture(model, jnp.array([[2, 10, 11, 12]]), layers=(0, 1))
>>> cap.attention[1].shape
(1, 4, 4, 4)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from gemma_lab.model import Transformer, check_token_ids


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Capture:
    """What one forward pass exposed at the tap point.

    Attributes:
        attention: {layer: probs [B, N, T, S]} float32, for captured layers.
        residual: {layer: [B, T, D]}, residual stream after each captured
            layer (before the final norm).
        logits: [B, T, V], or None when captured without logits.
    """

    attention: dict[int, Array]
    residual: dict[int, Array]
    logits: Array | None = None

    @property
    def layers(self) -> tuple[int, ...]:
        """The captured layers, in increasing order."""
        return tuple(sorted(self.attention))

    def probs(self, layer: int, head: int, row: int = 0) -> np.ndarray:
        """One head's attention map as a NumPy array [T, S].

        Args:
            layer: a captured layer.
            head: query head index in [0, N).
            row: batch row.

        Raises:
            KeyError: `layer` was not captured.
            IndexError: `head` or `row` out of range.
        """
        probs = self.layer_probs(layer, row)
        if not 0 <= head < probs.shape[0]:
            raise IndexError(
                f"head must be in [0, {probs.shape[0]}), got {head}"
            )
        return probs[head]

    def layer_probs(self, layer: int, row: int = 0) -> np.ndarray:
        """All heads of one layer as a NumPy array [N, T, S].

        Raises:
            KeyError: `layer` was not captured.
            IndexError: `row` out of range.
        """
        if layer not in self.attention:
            raise KeyError(
                f"layer {layer} was not captured; captured: {self.layers}"
            )
        probs = self.attention[layer]
        if not 0 <= row < probs.shape[0]:
            raise IndexError(f"row must be in [0, {probs.shape[0]}), got {row}")
        return np.asarray(probs[row])


def check_layers(
    layers: Iterable[int] | None, num_layers: int
) -> tuple[int, ...]:
    """Validates requested layers; None means all. Returns a sorted tuple.

    Negative indices count from the end, as in Python (-1 is the last layer).

    Raises:
        ValueError: a layer outside [-L, L), or an empty selection.
    """
    if layers is None:
        return tuple(range(num_layers))
    chosen = set()
    for layer in layers:
        if not -num_layers <= int(layer) < num_layers:
            raise ValueError(
                f"layers must lie in [-{num_layers}, {num_layers}), got {layer}"
            )
        chosen.add(int(layer) % num_layers)
    if not chosen:
        raise ValueError("layers must name at least one layer, got none")
    return tuple(sorted(chosen))


def capture(
    model: Transformer,
    tokens: Int[Array, "B T"],
    positions: Int[Array, "B T"] | None = None,
    *,
    layers: Iterable[int] | None = None,
    head_mask: Float[Array, "L N"] | None = None,
    return_logits: bool = True,
    jit: bool = True,
) -> Capture:
    """Runs the model once and keeps attention and residuals of `layers`.

    The logits are those of a plain forward pass: the tap point only reads
    values the forward computes anyway. With `jit=True` the pass is compiled
    once per token shape and layer selection; `jit=False` runs eagerly, or
    traces inside a caller's own `jax.jit` / `nnx.jit`.

    Args:
        model: the language model.
        tokens: token ids [B, T].
        positions: absolute positions [B, T], -1 for padding; default 0..T-1.
        layers: layers to keep (default: all). Negative indices count from
            the end.
        head_mask: optional [L, N] factors on head outputs (0 ablates).
        return_logits: False skips the output head (`logits` is None).
        jit: compile the pass with `nnx.jit` (a no-op when already traced).

    Returns:
        A `Capture` with probs [B, N, T, T] and residuals [B, T, D].

    Raises:
        ValueError: `tokens` not 2-D, concrete ids outside the vocabulary,
            or a layer out of range.
    """
    if jnp.ndim(tokens) != 2:
        raise ValueError(
            f"tokens must have shape [B, T], got shape {jnp.shape(tokens)}"
        )
    chosen = check_layers(layers, len(model.layers))
    # Checked here: under nnx.jit the forward pass only sees traced ids.
    check_token_ids(tokens, model.config.vocab_size, positions)
    run = _capture_jit if jit else _capture
    return run(
        model, jnp.asarray(tokens), positions, head_mask, chosen, return_logits
    )


def _capture(model, tokens, positions, head_mask, layers, return_logits):
    out = model.forward(
        tokens,
        positions,
        capture_layers=layers,
        head_mask=head_mask,
        return_logits=return_logits,
    )
    return Capture(
        attention=dict(out.attention),
        residual=dict(out.residual),
        logits=out.logits,
    )


_capture_jit = nnx.jit(_capture, static_argnums=(4, 5))


def residual_stream(cap: Capture) -> Float[Array, "L B T D"]:
    """The captured residuals stacked in layer order [L_captured, B, T, D]."""
    return jnp.stack([cap.residual[layer] for layer in cap.layers])
