"""The compiled steps of generation and the shapes of their cache.

- prefill: one forward pass over a prompt chunk that fills the KV cache and
  gives the logits of the next token; decode step: one forward pass over a
  single new token per row, with the next token sampled in the same
  compiled call.
- bucket: prompt chunks and caches are padded to `bucket_length`, so
  prompts of similar lengths share one compiled prefill.
- live slots: while rows are shorter than the cache, steps run on rings cut
  to the slots in use (`live_slots`), so a short generation in a long cache
  reads no empty slots.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gemma_lab.attention import resize_ring
from gemma_lab.checks import is_int
from gemma_lab.model import Cache
from gemma_lab.sampling import SAMPLING_FLAGS, next_tokens

_SMALL_BUCKET = 32
_LARGE_STEP = 512


def bucket_length(n: int) -> int:
    """The padded length used for `n` tokens.

    Powers of two from 32 up to 512, then multiples of 512, so that prompts of
    similar length share one compiled function and padding stays below half.

    >>> [bucket_length(n) for n in (1, 33, 500, 600, 1100)]
    [32, 64, 512, 1024, 1536]
    """
    if not is_int(n) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    if n > _LARGE_STEP:
        return -(-n // _LARGE_STEP) * _LARGE_STEP
    return max(_SMALL_BUCKET, 1 << (n - 1).bit_length())


def cache_capacity(cache: Cache) -> int:
    """The most positions a row of `cache` can hold (its global slots)."""
    return max(layer.positions.shape[1] for layer in cache)


@functools.lru_cache(maxsize=8)
def compiled_steps(graphdef, treedef):
    """Jit-compiled prefill and decode steps for one model structure.

    Kept per structure, so samplers over equal models (or the same model
    rebuilt after a weight change) share their compiled code. The weights
    come in as a flat list of arrays (`treedef` rebuilds the state), which
    jit passes on faster than a tree of variables: that matters once per
    decoded token.
    """

    def merge(leaves):
        return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))

    def prefill(leaves, tokens, positions, cache, last):
        module = merge(leaves)
        out = module.forward(
            tokens, positions, cache=cache, return_logits=False
        )
        hidden = jnp.take_along_axis(out.hidden, last[:, None, None], 1)
        return module.logits(hidden[:, 0]), out.cache

    def prefill_images(leaves, prompt, cache, last):
        module = merge(leaves)
        out = module.forward(
            prompt.tokens, prompt.positions, cache=cache,
            soft_embeddings=prompt.soft_embeddings,
            soft_mask=prompt.soft_mask, groups=prompt.groups,
            return_logits=False,
        )  # fmt: skip
        hidden = jnp.take_along_axis(out.hidden, last[:, None, None], 1)
        return module.logits(hidden[:, 0]), out.cache

    def decode(leaves, tokens, positions, cache, key, step, temperature,
               top_p, *, with_logits, **flags):  # fmt: skip
        # One call per token: the forward step and the sampling of the next
        # token are compiled together; logits leave only when asked for.
        module = merge(leaves)
        out = module.forward(
            tokens[:, None], positions[:, None], cache=cache,
            return_logits=False,
        )  # fmt: skip
        hidden = out.hidden[:, 0]
        if flags["greedy"] and not (with_logits or flags["with_logprobs"]):
            # Only the picks are needed: the head need not write logits.
            new = module.greedy_tokens(hidden)
            return new, jnp.zeros(new.shape, jnp.float32), None, out.cache
        logits = module.logits(hidden)
        new, logprobs = next_tokens.__wrapped__(
            logits, key, step, temperature, top_p, **flags
        )
        return new, logprobs, logits if with_logits else None, out.cache

    return (
        jax.jit(prefill),
        jax.jit(prefill_images),
        jax.jit(
            decode,
            donate_argnums=3,
            static_argnames=("with_logits", *SAMPLING_FLAGS),
        ),
    )


_LIVE_FLOOR = 128


def live_slots(positions: int, capacity: int) -> int:
    """Ring slots in use while every position held is below `positions`.

    The smallest of 128, 512, 2048, ... (x4) that is at least `positions`,
    and at most the cache's `capacity`. Coarse steps keep the compiled
    variants of the prefill and decode steps few: a generation compiles
    once more each time its rows cross a step.

    >>> [live_slots(n, 4096) for n in (1, 128, 129, 600, 3000, 9000)]
    [128, 128, 512, 2048, 4096, 4096]
    """
    slots = _LIVE_FLOOR
    while slots < positions:
        slots *= 4
    return min(slots, capacity)


def live_cache(cache: Cache, slots: int, sizes: Sequence[int]) -> Cache:
    """Each layer's ring resized to `slots`, at most its full size."""
    return tuple(
        resize_ring(layer, min(slots, size))
        for layer, size in zip(cache, sizes, strict=True)
    )
