"""Greedy decoding with the KV cache.

A prompt is prefilled in one pass, then tokens are decoded one at a time by a
jit-compiled step that reads and writes the cache. Shapes stay fixed (the
cache is sized once), so the step compiles once.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from gemma_lab.model import Transformer


@nnx.jit
def _prefill(model: Transformer, tokens, positions, cache):
    out = model.forward(tokens, positions, cache=cache)
    return out.logits[:, -1], out.cache


@nnx.jit
def _decode_step(model: Transformer, token, position, cache):
    out = model.forward(token[:, None], position[:, None], cache=cache)
    return out.logits[:, -1], out.cache


def greedy(
    model: Transformer,
    prompt: list[int],
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = (1, 106),
) -> list[int]:
    """Greedy continuation of one prompt.

    Args:
        model: the language model.
        prompt: token ids, BOS included.
        max_new_tokens: upper bound on generated tokens.
        stop_ids: generation ends after any of these ids (kept in the output).

    Returns:
        The generated ids, without the prompt.

    Raises:
        ValueError: empty prompt, or prompt plus new tokens longer than the
            model's context.
    """
    if not prompt:
        raise ValueError("prompt must hold at least one token, got []")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    total = len(prompt) + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt)} tokens) + max_new_tokens "
            f"({max_new_tokens}) exceeds the context of "
            f"{model.config.max_seq_len} tokens"
        )
    cache = model.init_cache(1, total)
    tokens = jnp.asarray([prompt], jnp.int32)
    positions = jnp.arange(len(prompt), dtype=jnp.int32)[None]
    logits, cache = _prefill(model, tokens, positions, cache)

    generated = []
    for step in range(max_new_tokens):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        generated.append(int(token[0]))
        if generated[-1] in stop_ids or step == max_new_tokens - 1:
            break
        position = jnp.asarray([len(prompt) + step], jnp.int32)
        logits, cache = _decode_step(model, token, position, cache)
    return generated


def recompute_greedy(
    model: Transformer, prompt: list[int], *, max_new_tokens: int
) -> list[int]:
    """Greedy continuation by recomputing the whole prefix at every step.

    Slow and cache-free; the reference that `greedy` is tested against.
    """
    ids = list(prompt)
    for _ in range(max_new_tokens):
        logits = model(jnp.asarray([ids], jnp.int32))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt) :]
