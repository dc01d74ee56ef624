"""Grouped-query attention of Gemma 3, with RoPE, masks and the KV cache.

Letter legend, used in every einsum and shape note of gemma_lab:

    B batch               T query positions        S key / cache positions
    N query heads         K key-value heads        G query heads per KV head
    H head dim            D model width            F MLP hidden width
    V vocabulary          R LoRA rank              L layers
    W sliding window

Positions. Every token carries an absolute position (int32, -1 for padding).
Masks are derived from positions alone: a query at position p sees a key at
position q when 0 <= q <= p, and, on local layers, p - q < W (the query itself
counts towards W). Tokens that share a positive `group` id (the soft tokens of
one image) also see each other in both directions. Fully masked rows (padding
queries) use a large negative score instead of -inf, so they stay finite.

KV cache. Each layer keeps a ring buffer of S slots: keys, values and the
position held by each slot (-1 when empty). A token at position p lives in slot
p % S. Local layers need only S = W slots; global layers need as many slots as
the longest sequence. Attention over a chunk reads the old slots and the chunk
itself, then the chunk is written into the ring; a single token (a decode
step) is written first and then reads the ring alone.

RoPE is the split-half ("rotate half") form of the reference, with the
frequencies computed in float32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from gemma_lab.config import AttentionKind, TransformerConfig
from gemma_lab.layers import Linear, RMSNorm

_MASKED = float(jnp.finfo(jnp.float32).min)


def rope(
    x: Float[Array, "B T N H"],
    positions: Int[Array, "B T"],
    *,
    base: float,
    scale: float = 1.0,
) -> Float[Array, "B T N H"]:
    """Rotates pairs (x[i], x[i + H/2]) by position-dependent angles.

    Args:
        x: queries or keys.
        positions: absolute positions; divided by `scale` (linear scaling).
        base: RoPE base (10,000 local, 1,000,000 global in Gemma 3).
        scale: linear position scaling factor.

    Returns:
        The rotated `x`, in its dtype.
    """
    half = x.shape[-1] // 2
    exponents = jnp.arange(half, dtype=jnp.float32) * 2 / x.shape[-1]
    inv_freq = 1.0 / (base**exponents)
    angles = positions.astype(jnp.float32)[..., None] / scale * inv_freq
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return jnp.concatenate(
        [first * cos - second * sin, second * cos + first * sin], axis=-1
    )


def attention_mask(
    query_positions: Int[Array, "B T"],
    key_positions: Int[Array, "B S"],
    *,
    window: int | None,
    query_groups: Int[Array, "B T"] | None = None,
    key_groups: Int[Array, "B S"] | None = None,
) -> Bool[Array, "B T S"]:
    """Which keys each query may attend to.

    Args:
        query_positions: positions of the queries, -1 for padding.
        key_positions: positions of the keys, -1 for empty or padding.
        window: W for a local layer, None for a global layer.
        query_groups: optional bidirectional group ids of the queries
            (0 means none); queries see every key of their own group.
        key_groups: the keys' group ids; required with `query_groups`.

    Returns:
        True where attention is allowed.
    """
    q = query_positions[:, :, None]
    k = key_positions[:, None, :]
    allowed = (k <= q) & (k >= 0) & (q >= 0)
    if query_groups is not None:
        qg = query_groups[:, :, None]
        same_group = (qg > 0) & (qg == key_groups[:, None, :])
        allowed = allowed | (same_group & (k >= 0))
    if window is not None:
        allowed = allowed & (q - k < window)
    return allowed


def attention_probs(
    queries: Float[Array, "B T N H"],
    keys: Float[Array, "B S K H"],
    mask: Bool[Array, "B T S"],
) -> Float[Array, "B N T S"]:
    """Softmax of query-key scores, computed in float32.

    Queries must already carry the 1/sqrt(query_pre_attn_scalar) factor.

    Returns:
        Probabilities over keys, float32; masked keys get exactly 0 unless a
        row is fully masked (then the row is uniform, never NaN).
    """
    b, t, n, h = queries.shape
    k = keys.shape[2]
    grouped = queries.reshape(b, t, k, n // k, h)
    scores = jnp.einsum("BTKGH,BSKH->BKGTS", grouped, keys)
    scores = scores.astype(jnp.float32).reshape(b, n, t, -1)
    scores = jnp.where(mask[:, None], scores, _MASKED)
    return jax.nn.softmax(scores, axis=-1)


def attend(
    probs: Float[Array, "B N T S"], values: Float[Array, "B S K H"]
) -> Float[Array, "B T N H"]:
    """Mixes values by attention probabilities (grouped-query)."""
    b, n, t, s = probs.shape
    k, h = values.shape[2:]
    # The G heads and T queries of one KV head form one axis of G * T rows:
    # one plain product per (B, K), which XLA's CPU backend runs several
    # times faster than an einsum that keeps T apart (decode steps).
    rows = probs.astype(values.dtype).reshape(b, k, n // k * t, s)
    out = jnp.einsum("BKGS,BSKH->BKGH", rows, values)
    out = out.reshape(b, k, n // k, t, h)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, n, h)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerCache:
    """Ring buffer of one layer's keys and values.

    Attributes:
        keys: [B, S, K, H].
        values: [B, S, K, H].
        positions: [B, S] int32, the position held by each slot, -1 if empty.
    """

    keys: Array
    values: Array
    positions: Array

    @classmethod
    def empty(
        cls, batch: int, slots: int, num_kv_heads: int, head_dim: int, dtype
    ) -> LayerCache:
        shape = (batch, slots, num_kv_heads, head_dim)
        return cls(
            keys=jnp.zeros(shape, dtype),
            values=jnp.zeros(shape, dtype),
            positions=jnp.full((batch, slots), -1, jnp.int32),
        )


def write_cache(
    cache: LayerCache,
    keys: Float[Array, "B T K H"],
    values: Float[Array, "B T K H"],
    positions: Int[Array, "B T"],
) -> LayerCache:
    """Writes a chunk into the ring buffer: position p goes to slot p % S.

    When the chunk holds more than S tokens, each slot keeps the newest one.
    Padding tokens (position -1) are not written. Positions in a row of the
    chunk must be consecutive (padding aside), which prompts always are.
    """
    slots = cache.positions.shape[1]
    valid = positions >= 0
    last = jnp.max(jnp.where(valid, positions, -1), axis=1)  # [B]
    first = jnp.min(jnp.where(valid, positions, jnp.iinfo(jnp.int32).max), 1)

    # The newest position p <= last with p % S == s, for every slot s.
    slot_ids = jnp.arange(slots, dtype=jnp.int32)[None, :]
    wanted = last[:, None] - (last[:, None] - slot_ids) % slots  # [B, S]
    take = (wanted >= first[:, None]) & (wanted >= 0)

    # Gather the chunk index holding `wanted` (exact, no arithmetic on values).
    hits = positions[:, None, :] == wanted[:, :, None]  # [B, S, T]
    index = jnp.argmax(hits, axis=-1)  # [B, S]
    gather = jax.vmap(lambda x, i: x[i])
    new_keys = gather(keys, index)
    new_values = gather(values, index)

    sel = take[:, :, None, None]
    return LayerCache(
        keys=jnp.where(sel, new_keys.astype(cache.keys.dtype), cache.keys),
        values=jnp.where(
            sel, new_values.astype(cache.values.dtype), cache.values
        ),
        positions=jnp.where(take, wanted, cache.positions),
    )


def write_token(
    cache: LayerCache,
    keys: Float[Array, "B 1 K H"],
    values: Float[Array, "B 1 K H"],
    positions: Int[Array, "B 1"],
) -> LayerCache:
    """Writes one token per row into its slot p % S, a scatter in place.

    The one-token case of `write_cache`: it touches B slots instead of
    rewriting the whole ring, so a decode step whose cache is donated reads
    the cache once and copies none of it. A padding row (position -1) is
    left unchanged.
    """
    slots = cache.positions.shape[1]
    token_positions = positions[:, 0]
    # Slot S is out of range: mode="drop" skips the padding rows' writes.
    slot = jnp.where(token_positions >= 0, token_positions % slots, slots)
    rows = jnp.arange(token_positions.shape[0])

    def put(ring, new):
        return ring.at[rows, slot].set(new.astype(ring.dtype), mode="drop")

    return LayerCache(
        keys=put(cache.keys, keys[:, 0]),
        values=put(cache.values, values[:, 0]),
        positions=put(cache.positions, token_positions),
    )


def resize_ring(cache: LayerCache, slots: int) -> LayerCache:
    """The ring with `slots` slots: its leading slots, or padded with empty.

    Exact while every position the ring holds, and every one written into
    the result, lies below both sizes: position p then sits in slot p of
    either ring (p % S = p), and the slots cut off or added are empty. The
    sampler decodes in a ring of the slots in use, grown as rows get
    longer, so that attention reads no empty slots.
    """
    size = cache.positions.shape[1]
    if slots == size:
        return cache
    if slots < size:
        return jax.tree.map(lambda ring: ring[:, :slots], cache)
    pad = [(0, 0), (0, slots - size), (0, 0), (0, 0)]
    return LayerCache(
        keys=jnp.pad(cache.keys, pad),
        values=jnp.pad(cache.values, pad),
        positions=jnp.pad(cache.positions, pad[:2], constant_values=-1),
    )


class Attention(nnx.Module):
    """One Gemma 3 attention layer: projections, QK-norm, RoPE, GQA.

    Args:
        config: the model's architecture.
        kind: local (sliding window) or global.
        rngs: random streams for initialisation; keyword-only.
        param_dtype: dtype of the stored weights.
        dtype: compute dtype.
    """

    def __init__(
        self,
        config: TransformerConfig,
        kind: AttentionKind,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        d, n, k, h = (
            config.width,
            config.num_heads,
            config.num_kv_heads,
            config.head_dim,
        )
        self.q_proj = Linear(d, n * h, **kw)
        self.k_proj = Linear(d, k * h, **kw)
        self.v_proj = Linear(d, k * h, **kw)
        self.o_proj = Linear(n * h, d, **kw)
        self.q_norm = RMSNorm(h, eps=config.norm_eps, param_dtype=param_dtype)
        self.k_norm = RMSNorm(h, eps=config.norm_eps, param_dtype=param_dtype)
        self.kind = kind
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.window = (
            config.sliding_window if kind is AttentionKind.LOCAL else None
        )
        self.rope_base, self.rope_scale = config.rope(kind)
        self.query_scale = config.query_pre_attn_scalar**-0.5

    def __call__(
        self,
        x: Float[Array, "B T D"],
        positions: Int[Array, "B T"],
        *,
        groups: Int[Array, "B T"] | None = None,
        cache: LayerCache | None = None,
        head_mask: Float[Array, " N"] | None = None,
    ) -> tuple[Array, LayerCache | None, Array]:
        """Attends from a chunk of tokens to the cache and the chunk itself.

        Args:
            x: normalised residual stream of the chunk.
            positions: absolute positions of the chunk, -1 for padding.
            groups: bidirectional group ids (image soft tokens), 0 for none.
            cache: this layer's cache, or None for a cache-free forward.
            head_mask: optional per-head factor on the head outputs (0 to
                ablate a head), applied before the output projection.

        Returns:
            (output [B, T, D], updated cache or None, probs [B, N, T, S]).
        """
        b, t, _ = x.shape
        queries = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        keys = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        values = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)

        # QK-norm comes before RoPE, as in the reference.
        queries = rope(
            self.q_norm(queries),
            positions,
            base=self.rope_base,
            scale=self.rope_scale,
        )
        keys = rope(
            self.k_norm(keys),
            positions,
            base=self.rope_base,
            scale=self.rope_scale,
        )
        queries = queries * jnp.asarray(self.query_scale, queries.dtype)

        # Keys seen by the chunk: the old cache slots, then the chunk itself.
        # A single token is written first and attends over the ring alone:
        # the slot it takes held position p - S, which a local layer's
        # window (S = W) excludes anyway, and a token's group holds itself.
        all_keys, all_values, key_positions = keys, values, positions
        key_groups = groups
        if cache is not None and t == 1:
            cache = write_token(cache, keys, values, positions)
            all_keys = cache.keys.astype(keys.dtype)
            all_values = cache.values.astype(values.dtype)
            key_positions, groups, key_groups = cache.positions, None, None
        elif cache is not None:
            all_keys = jnp.concatenate([cache.keys.astype(keys.dtype), keys], 1)
            all_values = jnp.concatenate(
                [cache.values.astype(values.dtype), values], 1
            )
            key_positions = jnp.concatenate([cache.positions, positions], 1)
            if groups is not None:
                old = jnp.zeros_like(cache.positions)
                key_groups = jnp.concatenate([old, groups], 1)
            cache = write_cache(cache, keys, values, positions)

        mask = attention_mask(
            positions,
            key_positions,
            window=self.window,
            query_groups=groups,
            key_groups=key_groups,
        )
        probs = attention_probs(queries, all_keys, mask)
        heads = attend(probs, all_values)  # [B, T, N, H]
        if head_mask is not None:
            heads = heads * head_mask[None, None, :, None].astype(heads.dtype)
        out = self.o_proj(heads.reshape(b, t, self.num_heads * self.head_dim))
        return out, cache, probs
