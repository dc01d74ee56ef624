"""Sampling methods: small pure functions over next-token logits [B, V].

Greedy (temperature 0), temperature, top-k and top-p (nucleus, Holtzman et
al. 2019), with an explicit `jax.random` key, so the same key gives the same
sample. Log-probabilities are those of the model's own distribution, before
temperature, top-k or top-p. `next_tokens` is one compiled sampling step of
`gemma_lab.sampler.Sampler`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from gemma_lab.layers import greedy_tokens


def top_k_logits(logits: Float[Array, "B V"], k: int) -> Float[Array, "B V"]:
    """Keeps the k largest logits of each row; the others become -inf.

    Ties with the k-th largest value are kept too.
    """
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_logits(
    logits: Float[Array, "B V"], p: float | Array
) -> Float[Array, "B V"]:
    """Keeps the smallest set of most likely tokens whose mass reaches p.

    A token is kept when the probability mass of the tokens strictly more
    likely than it is below p, so the most likely token is always kept and
    p close to 0 keeps only it and the tokens tied with it. p >= 1 keeps
    every token (a float32 running sum can reach 1 before the last).
    """
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where((mass_before < p) | (p >= 1), ordered, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_tokens(
    logits: Float[Array, "B V"],
    key: Array,
    *,
    temperature: float | Array,
    top_k: int | None = None,
    top_p: float | Array | None = None,
) -> Int[Array, " B"]:
    """Draws one token per row: temperature, then top-k, then top-p.

    Args:
        logits: next-token logits.
        key: a `jax.random.key`; the same key gives the same tokens.
        temperature: > 0; logits are divided by it.
        top_k: keep only the k most likely tokens (None: all).
        top_p: keep the nucleus of mass p (None: all).

    Returns:
        Token ids, int32.
    """
    scaled = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        scaled = top_k_logits(scaled, top_k)
    if top_p is not None:
        scaled = top_p_logits(scaled, top_p)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def token_logprobs(
    logits: Float[Array, "B V"], tokens: Int[Array, " B"]
) -> Float[Array, " B"]:
    """log p(token) under softmax(logits), in float32."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


SAMPLING_FLAGS = ("greedy", "top_k", "use_top_p", "with_logprobs")


@functools.partial(jax.jit, static_argnames=SAMPLING_FLAGS)
def next_tokens(logits, key, step, temperature, top_p, *, greedy, top_k,
                 use_top_p, with_logprobs=True):  # fmt: skip
    """One sampling step under jit; returns (tokens [B], logprobs [B]).

    Without `with_logprobs` the log-probabilities are zeros (this skips a
    softmax over the vocabulary).
    """
    if greedy:
        tokens = greedy_tokens(logits)
    else:
        tokens = sample_tokens(
            logits,
            jax.random.fold_in(key, step),
            temperature=temperature,
            top_k=top_k,
            top_p=top_p if use_top_p else None,
        )
    if not with_logprobs:
        return tokens, jnp.zeros(tokens.shape, jnp.float32)
    return tokens, token_logprobs(logits, tokens)
