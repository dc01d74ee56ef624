"""Interpretability analyses on top of `gemma_lab.capture`.

Vocabulary:

- head score: one number per (layer, head), held by `HeadScores` as an
  array [L, N] whose rows follow the captured layers.
- diagonal score: the mean attention a query at position t pays to the key
  at t - offset. Offset 1 gives the previous-token score.
- induction score: on a random sequence repeated with period P, a query in a
  repeat attends to the token just after its previous occurrence, i.e. to
  key t - P + 1 (Olsson et al., 2022, "In-context learning and induction
  heads"). It is the diagonal score at offset P - 1 over the repeats.
- BOS sink score: the mean attention paid to key 0 (the <bos> token) by the
  queries after it; heads park unused attention there (Xiao et al., 2023,
  "Efficient streaming language models with attention sinks").
- logit lens: the residual stream after a layer read out through the final
  norm and the tied embedding, as if the layers above it were skipped
  (nostalgebraist, 2020).
- ablation: a head's output multiplied by 0 through `head_mask` [L, N]; its
  effect is the rise in mean next-token loss (negative log-likelihood, nats).

Scores assume a cache-free capture, where key s is the token at position s.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int
from tqdm.auto import tqdm

from gemma_lab.capture import Capture
from gemma_lab.config import TransformerConfig
from gemma_lab.model import Transformer

Head = tuple[int, int]
"""A (layer, head) pair."""


@dataclasses.dataclass(frozen=True)
class HeadScores:
    """One score per captured (layer, head).

    Attributes:
        values: [L_captured, N] NumPy array; row i belongs to `layers[i]`.
        layers: the layer index of each row.
        name: what was scored, used in plot titles.
    """

    values: np.ndarray
    layers: tuple[int, ...]
    name: str

    def __getitem__(self, head: Head) -> float:
        layer, index = head
        if layer not in self.layers:
            raise KeyError(f"layer {layer} not scored; scored: {self.layers}")
        return float(self.values[self.layers.index(layer), index])

    def top(self, k: int = 1) -> list[Head]:
        """The k highest-scoring (layer, head) pairs, best first."""
        order = np.argsort(-self.values, axis=None, kind="stable")[:k]
        rows, heads = np.unravel_index(order, self.values.shape)
        return [
            (self.layers[r], int(h)) for r, h in zip(rows, heads, strict=True)
        ]

    def below(self, threshold: float) -> list[Head]:
        """All (layer, head) pairs scoring below `threshold`."""
        rows, heads = np.nonzero(self.values < threshold)
        return [
            (self.layers[r], int(h)) for r, h in zip(rows, heads, strict=True)
        ]


def diagonal_score(
    probs: Float[Array, "B N T S"], offset: int, *, start: int | None = None
) -> Float[Array, " N"]:
    """Mean attention from query t to key t - offset, per head.

    Args:
        probs: attention of a cache-free pass (key s is position s).
        offset: how far back the key lies, >= 0.
        start: first query included (default `offset`); must be >= offset.

    Returns:
        The mean over batch rows and queries t in [start, T).
    """
    start = offset if start is None else start
    t = probs.shape[2]
    if not 0 <= offset <= start < t:
        raise ValueError(
            f"need 0 <= offset <= start < T={t}, got offset={offset}, "
            f"start={start}"
        )
    queries = jnp.arange(start, t)
    picked = probs[:, :, queries, queries - offset]  # [B, N, T - start]
    return picked.mean(axis=(0, 2))


def key_score(
    probs: Float[Array, "B N T S"], key: int = 0, *, start: int = 1
) -> Float[Array, " N"]:
    """Mean attention paid to one key by queries t >= start, per head."""
    if not 0 <= key < probs.shape[3] or not 0 <= start < probs.shape[2]:
        raise ValueError(
            f"key must be in [0, {probs.shape[3]}) and start in "
            f"[0, {probs.shape[2]}), got key={key}, start={start}"
        )
    return probs[:, :, start:, key].mean(axis=(0, 2))


def _score_layers(cap: Capture, name: str, score_fn) -> HeadScores:
    if not cap.attention:
        raise ValueError("cap holds no attention; capture some layers first")
    values = [np.asarray(score_fn(cap.attention[i])) for i in cap.layers]
    return HeadScores(np.stack(values), cap.layers, name)


def previous_token_scores(cap: Capture) -> HeadScores:
    """Mean attention to the previous token, per captured head."""
    return _score_layers(
        cap, "previous-token score", lambda p: diagonal_score(p, 1)
    )


def bos_sink_scores(cap: Capture) -> HeadScores:
    """Mean attention to key 0 (<bos>) from the queries after it."""
    return _score_layers(cap, "BOS sink score", key_score)


def induction_scores(cap: Capture, period: int) -> HeadScores:
    """Induction score per head on a sequence repeated with `period`.

    The capture must come from `[bos] + x + x + ...` with len(x) == period
    (see `repeated_random_tokens`): queries from position period + 1 on are
    scored on key t - period + 1.
    """
    if period < 2:
        raise ValueError(f"period must be >= 2, got {period}")
    return _score_layers(
        cap,
        "induction score",
        lambda p: diagonal_score(p, period - 1, start=period + 1),
    )


GEMMA3_VOCAB_SIZE = 262_144
"""The vocabulary size of every Gemma 3 model."""


def repeated_random_tokens(
    *,
    key: Array,
    length: int = 50,
    repeats: int = 2,
    vocab_size: int = GEMMA3_VOCAB_SIZE,
    low: int | None = None,
    high: int | None = None,
    bos_id: int = 2,
) -> Int[Array, "1 T"]:
    """`[bos] + x * repeats` for x of `length` uniform ids in [low, high).

    Args:
        key: a `jax.random.key`; the same key gives the same ids.
        length: the period P of the repeated sequence (>= 2).
        repeats: how many times the sequence appears (>= 1).
        vocab_size: the model's vocabulary size V, e.g.
            `model.config.vocab_size`; default Gemma 3's 262144.
        low: the smallest id drawn. Default: min(1000, high // 2), which
            for Gemma 3 skips its control, byte and unused pieces.
        high: one past the largest id drawn, at most V. Default:
            min(250000, V), which for Gemma 3 skips the unused pieces at
            the end of its vocabulary.
        bos_id: the first id, in [0, V).

    Returns:
        Token ids [1, 1 + length * repeats], int32.

    Raises:
        ValueError: on a length, repeats or vocab_size out of range, or
            ids that do not satisfy 0 <= low < high <= vocab_size and
            0 <= bos_id < vocab_size.
    """
    low, high = _id_range(vocab_size, low, high, bos_id)
    if length < 2 or repeats < 1:
        raise ValueError(
            f"need length >= 2 and repeats >= 1; got length={length}, "
            f"repeats={repeats}"
        )
    x = jax.random.randint(key, (length,), low, high, dtype=jnp.int32)
    bos = jnp.array([bos_id], jnp.int32)
    return jnp.concatenate([bos, jnp.tile(x, repeats)])[None]


def _id_range(vocab_size, low, high, bos_id) -> tuple[int, int]:
    """The checked [low, high) of `repeated_random_tokens`."""
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    high = min(250_000, vocab_size) if high is None else high
    low = min(1000, high // 2) if low is None else low
    if not 0 <= low < high <= vocab_size:
        raise ValueError(
            f"need 0 <= low < high <= vocab_size; got low={low}, "
            f"high={high}, vocab_size={vocab_size}"
        )
    if not 0 <= bos_id < vocab_size:
        raise ValueError(
            f"bos_id must lie in [0, {vocab_size}) (vocab_size), got {bos_id}"
        )
    return low, high


@dataclasses.dataclass(frozen=True)
class LogitLens:
    """Top tokens read out of the residual stream after each layer.

    Attributes:
        layers: the layer of each row.
        token_ids: [L_captured, k] int, best first.
        probs: [L_captured, k] the softmax probability of each token.
        position: the position read.
    """

    layers: tuple[int, ...]
    token_ids: np.ndarray
    probs: np.ndarray
    position: int


def logit_lens(
    model: Transformer,
    cap: Capture,
    *,
    position: int = -1,
    row: int = 0,
    top_k: int = 5,
) -> LogitLens:
    """Reads each captured residual through the final norm and tied head.

    At the last layer this is exactly the model's own prediction, since the
    model's logits are the same final norm and head applied to that residual.

    Args:
        model: the model that produced `cap`.
        cap: a capture with residuals.
        position: query position to read (negative counts from the end).
        row: batch row.
        top_k: tokens kept per layer.

    Returns:
        A `LogitLens` with rows in the order of `cap.layers`.
    """
    if not cap.residual:
        raise ValueError("cap holds no residuals; capture some layers first")
    t = cap.residual[cap.layers[0]].shape[1]
    if not -t <= position < t or top_k < 1:
        raise ValueError(
            f"need position in [-{t}, {t}) and top_k >= 1, got "
            f"position={position}, top_k={top_k}"
        )
    residual = jnp.stack([cap.residual[i][row, position] for i in cap.layers])
    logits = model.logits(model.final_norm(residual))  # [L, V]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_probs, top_ids = jax.lax.top_k(probs, top_k)
    return LogitLens(
        cap.layers, np.asarray(top_ids), np.asarray(top_probs), position % t
    )


def ablation_mask(
    config: TransformerConfig, heads: Sequence[Head] = ()
) -> Float[Array, "L N"]:
    """A [L, N] float32 mask of ones with 0 at each (layer, head) in `heads`."""
    num_layers, num_heads = config.num_layers, config.num_heads
    mask = np.ones((num_layers, num_heads), np.float32)
    for layer, head in heads:
        if not (0 <= layer < num_layers and 0 <= head < num_heads):
            raise ValueError(
                f"heads must be (layer, head) in [0, {num_layers}) x "
                f"[0, {num_heads}), got ({layer}, {head})"
            )
        mask[layer, head] = 0.0
    return jnp.asarray(mask)


def token_nll(
    logits: Float[Array, "B T V"], targets: Int[Array, "B T"]
) -> Float[Array, "B T"]:
    """Negative log-likelihood (nats) of each target under its logits."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _mean_loss(graphdef, state, tokens, mask, start):
    model = nnx.merge(graphdef, state)
    out = model.forward(tokens, head_mask=mask, return_logits=False)
    # Logits only where a target lies: the tied head dominates the cost.
    logits = model.logits(out.hidden[:, start - 1 : -1])
    return token_nll(logits, tokens[:, start:]).mean()


def sequence_loss(
    model: Transformer,
    tokens: Int[Array, "B T"],
    *,
    start: int = 1,
    head_mask: Float[Array, "L N"] | None = None,
) -> float:
    """Mean next-token loss over the tokens at positions [start, T).

    Args:
        model: the language model.
        tokens: token ids [B, T]; each is predicted from those before it.
        start: first position whose token is scored, in [1, T).
        head_mask: optional [L, N] head factors (see `ablation_mask`).

    Returns:
        The mean negative log-likelihood in nats.
    """
    if jnp.ndim(tokens) != 2 or not 1 <= start < jnp.shape(tokens)[1]:
        raise ValueError(
            f"need tokens [B, T] and start in [1, T), got shape "
            f"{jnp.shape(tokens)} and start={start}"
        )
    if head_mask is None:
        head_mask = ablation_mask(model.config)
    graphdef, state = nnx.split(model)
    loss = _mean_loss(graphdef, state, jnp.asarray(tokens), head_mask, start)
    return float(loss)


@dataclasses.dataclass(frozen=True)
class Ablation:
    """The loss of a text with single heads ablated, one at a time.

    Attributes:
        heads: the ablated (layer, head) pairs.
        losses: [len(heads)] mean loss with each head ablated (nats).
        baseline: mean loss with no head ablated (nats).
        start: first scored position.
    """

    heads: tuple[Head, ...]
    losses: np.ndarray
    baseline: float
    start: int

    @property
    def increase(self) -> np.ndarray:
        """[len(heads)] loss rise caused by each ablation (nats)."""
        return self.losses - self.baseline


def ablate_heads(
    model: Transformer,
    tokens: Int[Array, "B T"],
    heads: Sequence[Head],
    *,
    start: int = 1,
    progress: bool = True,
) -> Ablation:
    """Zeroes each head in turn and measures the loss on [start, T).

    One compiled pass serves every head: only the mask changes.

    Args:
        model: the language model.
        tokens: token ids [B, T].
        heads: (layer, head) pairs, ablated one at a time.
        start: first position whose token is scored, in [1, T).
        progress: show a tqdm bar.

    Returns:
        An `Ablation` with the baseline and one loss per head.
    """
    heads = tuple((int(layer), int(head)) for layer, head in heads)
    masks = [ablation_mask(model.config, [h]) for h in heads]  # validates
    baseline = sequence_loss(model, tokens, start=start)
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(tokens)
    losses = [
        float(_mean_loss(graphdef, state, tokens, mask, start))
        for mask in tqdm(masks, desc="ablating heads", disable=not progress)
    ]
    return Ablation(heads, np.array(losses), baseline, start)


def sample_heads(
    config: TransformerConfig,
    count: int,
    *,
    key: Array,
    exclude: Sequence[Head] = (),
) -> list[Head]:
    """`count` distinct (layer, head) pairs drawn uniformly, none in `exclude`.

    Raises:
        ValueError: fewer than `count` heads remain after `exclude`.
    """
    excluded = {(int(layer), int(head)) for layer, head in exclude}
    pool = [
        (layer, head)
        for layer in range(config.num_layers)
        for head in range(config.num_heads)
        if (layer, head) not in excluded
    ]
    if not 0 <= count <= len(pool):
        raise ValueError(
            f"count must be in [0, {len(pool)}] (heads left after exclude), "
            f"got {count}"
        )
    picks = jax.random.choice(key, len(pool), (count,), replace=False)
    return [pool[int(i)] for i in picks]
