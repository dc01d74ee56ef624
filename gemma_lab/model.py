"""The Gemma 3 language model as a Flax NNX module.

`Transformer` maps token ids [B, T] to logits [B, T, V]. Its `forward` method
is the one entry that every other part of gemma_lab builds on; it can also

- read and write a KV cache (`gemma_lab.attention.LayerCache` per layer) for
  incremental decoding,
- replace the embeddings of chosen positions by precomputed soft tokens (image
  features), which are not multiplied by sqrt(D),
- let tokens of one group (one image) attend to each other bidirectionally,
- return attention probabilities and the residual stream of chosen layers
  (the single opt-in tap point used by `gemma_lab.capture`),
- scale each head's output (head ablation),
- stop before the output head, so training can compute logits only where the
  loss needs them.

A forward pass reads as: embed, then per layer norm -> attention -> norm ->
add, norm -> MLP -> norm -> add, then the final norm and the tied head.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from gemma_lab.attention import Attention, LayerCache
from gemma_lab.config import AttentionKind, TransformerConfig
from gemma_lab.layers import MLP, Embedder, RMSNorm

Cache = tuple[LayerCache, ...]
"""One `LayerCache` per layer."""


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    """What `Transformer.forward` returns.

    Attributes:
        logits: [B, T, V], or None when `return_logits=False`.
        hidden: [B, T, D], the final-normed residual stream (input to the head).
        cache: the updated cache, or None when none was given.
        attention: {layer: probs [B, N, T, S]} for the captured layers; S is
            the number of keys seen: cache slots, plus the chunk itself
            for a chunk of more than one token.
        residual: {layer: [B, T, D]} residual stream after each captured layer.
    """

    logits: Array | None
    hidden: Array
    cache: Cache | None = None
    attention: dict[int, Array] = dataclasses.field(default_factory=dict)
    residual: dict[int, Array] = dataclasses.field(default_factory=dict)


def check_token_ids(
    tokens: Int[Array, "B T"],
    vocab_size: int,
    positions: Int[Array, "B T"] | None = None,
) -> None:
    """Raises ValueError if concrete token ids fall outside [0, vocab_size).

    Ids at padding positions (-1 in `positions`) are not looked at. Traced
    ids (under `jax.jit`) have no values yet and are not checked; the check
    costs one min and one max otherwise.
    """
    if isinstance(tokens, jax.core.Tracer) or isinstance(
        positions, jax.core.Tracer
    ):
        return
    tokens = jnp.asarray(tokens)
    if tokens.size == 0:
        return
    if positions is not None:
        tokens = jnp.where(jnp.asarray(positions) >= 0, tokens, 0)
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"tokens must lie in [0, {vocab_size}) (the vocabulary), got "
            f"ids from {low} to {high}"
        )


class Block(nnx.Module):
    """One decoder layer with Gemma 3's four norms around attention and MLP."""

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
        norm = dict(eps=config.norm_eps, param_dtype=param_dtype)
        d = config.width
        self.pre_attention_norm = RMSNorm(d, **norm)
        self.attn = Attention(config, kind, **kw)
        self.post_attention_norm = RMSNorm(d, **norm)
        self.pre_mlp_norm = RMSNorm(d, **norm)
        self.mlp = MLP(d, config.mlp_dim, **kw)
        self.post_mlp_norm = RMSNorm(d, **norm)

    def __call__(
        self, x, positions, *, groups=None, cache=None, head_mask=None
    ):
        attn_out, cache, probs = self.attn(
            self.pre_attention_norm(x),
            positions,
            groups=groups,
            cache=cache,
            head_mask=head_mask,
        )
        x = x + self.post_attention_norm(attn_out)
        x = x + self.post_mlp_norm(self.mlp(self.pre_mlp_norm(x)))
        return x, cache, probs


class Transformer(nnx.Module):
    """Gemma 3 text model.

    Args:
        config: architecture, e.g. `gemma_lab.config.GEMMA3_270M`.
        rngs: random streams for initialisation; keyword-only.
        param_dtype: dtype of the stored parameters.
        dtype: compute (activation) dtype. float32 suits CPUs; bfloat16 suits
            TPUs and GPUs.

    >>> from gemma_lab import testing
    >>> model = Transformer(testing.TINY_CONFIG, rngs=nnx.Rngs(0))
    >>> model(jnp.array([[2, 10, 11]])).shape
    (1, 3, 512)
    """

    def __init__(
        self,
        config: TransformerConfig,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.config = config
        self.dtype = dtype
        self.embedder = Embedder(config.vocab_size, config.width, **kw)
        self.layers = nnx.List(
            [Block(config, kind, **kw) for kind in config.attention_kinds]
        )
        self.final_norm = RMSNorm(
            config.width, eps=config.norm_eps, param_dtype=param_dtype
        )

    def __call__(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"] | None = None,
    ) -> Float[Array, "B T V"]:
        """Logits for a batch of token ids (positions default to 0..T-1).

        Raises:
            ValueError: concrete token ids outside [0, vocab_size).
        """
        return self.forward(tokens, positions).logits

    def init_cache(self, batch: int, max_len: int, dtype=None) -> Cache:
        """An empty cache for `batch` rows of up to `max_len` positions.

        Local layers get min(W, max_len) slots, global layers `max_len`.
        """
        if max_len <= 0 or batch <= 0:
            raise ValueError(
                f"init_cache needs batch > 0 and max_len > 0, "
                f"got batch={batch}, max_len={max_len}"
            )
        c = self.config
        dtype = dtype or self.dtype
        caches = []
        for kind in c.attention_kinds:
            slots = max_len
            if kind is AttentionKind.LOCAL:
                slots = min(c.sliding_window, max_len)
            caches.append(
                LayerCache.empty(
                    batch, slots, c.num_kv_heads, c.head_dim, dtype
                )
            )
        return tuple(caches)

    def embed(
        self,
        tokens: Int[Array, "B T"],
        soft_embeddings: Float[Array, "B T D"] | None = None,
        soft_mask: Bool[Array, "B T"] | None = None,
    ) -> Float[Array, "B T D"]:
        """Token embeddings, with soft tokens placed where `soft_mask` is set.

        Soft tokens (projected image features) enter exactly as given: the
        sqrt(D) factor applies to token embeddings only.
        """
        x = self.embedder.encode(tokens)
        if soft_embeddings is None:
            return x
        if soft_mask is None:
            raise ValueError("soft_embeddings needs soft_mask, got None")
        soft = soft_embeddings.astype(x.dtype)
        return jnp.where(soft_mask[..., None], soft, x)

    def forward(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"] | None = None,
        *,
        cache: Cache | None = None,
        soft_embeddings: Float[Array, "B T D"] | None = None,
        soft_mask: Bool[Array, "B T"] | None = None,
        groups: Int[Array, "B T"] | None = None,
        capture_layers: tuple[int, ...] = (),
        head_mask: Float[Array, "L N"] | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Runs the model over a chunk of tokens.

        Args:
            tokens: token ids; padding ids are ignored where positions are -1.
            positions: absolute positions, -1 marks padding. Default 0..T-1.
            cache: per-layer caches from `init_cache` or a previous call.
            soft_embeddings: embeddings to use where `soft_mask` is True.
            soft_mask: positions that take `soft_embeddings`.
            groups: bidirectional attention groups (image ids, 0 for text).
            capture_layers: layers whose attention probabilities and output
                residual stream are returned. Static under jit.
            head_mask: [L, N] factors on head outputs (0 ablates a head).
            return_logits: False skips the output head (logits None).

        Returns:
            A `ModelOutput`.

        Raises:
            ValueError: concrete token ids outside the vocabulary (traced
                ids are not checked), or a cache with another layer count.
        """
        b, t = tokens.shape
        check_token_ids(tokens, self.config.vocab_size, positions)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        if cache is not None and len(cache) != len(self.layers):
            raise ValueError(
                f"cache has {len(cache)} layers, the model {len(self.layers)}"
            )

        x = self.embed(tokens, soft_embeddings, soft_mask)
        new_cache, attention, residual = [], {}, {}
        for i, block in enumerate(self.layers):
            x, layer_cache, probs = block(
                x,
                positions,
                groups=groups,
                cache=None if cache is None else cache[i],
                head_mask=None if head_mask is None else head_mask[i],
            )
            new_cache.append(layer_cache)
            if i in capture_layers:
                attention[i], residual[i] = probs, x

        hidden = self.final_norm(x)
        logits = self.embedder.decode(hidden) if return_logits else None
        return ModelOutput(
            logits=logits,
            hidden=hidden,
            cache=None if cache is None else tuple(new_cache),
            attention=attention,
            residual=residual,
        )

    def logits(self, hidden: Float[Array, "... D"]) -> Float[Array, "... V"]:
        """Applies the tied output head to final-normed hidden states."""
        return self.embedder.decode(hidden)

    def greedy_tokens(self, hidden: Float[Array, "B D"]) -> Int[Array, " B"]:
        """The id of each row's largest logit, from final-normed hidden
        states (see `Embedder.decode_greedy`)."""
        return self.embedder.decode_greedy(hidden)
