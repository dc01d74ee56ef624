"""Architecture settings of the Gemma 3 text model, and one preset per size.

A `TransformerConfig` holds only architecture numbers: widths, head counts,
the layer pattern, RoPE settings and the sliding window. Dtypes are not part
of it; they are chosen when a model is built (`param_dtype`, `dtype`).

Layer pattern: Gemma 3 interleaves five local (sliding-window) layers with one
global layer, so layers 5, 11, 17, ... attend over the whole context and the
others over the last `sliding_window` keys, the query itself included. Local
layers use RoPE base 10,000; global layers use base 1,000,000, stretched by a
linear position scaling factor of 8 on the 4B, 12B and 27B models.

The numbers follow the published Gemma 3 technical report and the released
checkpoints' config files.
"""

from __future__ import annotations

import dataclasses
import enum


class AttentionKind(enum.Enum):
    """Whether a layer attends over a sliding window or the whole context."""

    LOCAL = "local"
    GLOBAL = "global"


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Architecture of a Gemma 3 language model.

    Attributes:
        vocab_size: V, rows of the (tied) embedding table.
        width: D, the residual stream width.
        num_layers: L.
        num_heads: N, query heads per layer.
        num_kv_heads: K, key-value heads per layer (grouped-query attention).
        head_dim: H.
        mlp_dim: F, hidden width of the GeGLU MLP.
        query_pre_attn_scalar: queries are scaled by this ** -0.5. Equal to
            `head_dim` except on 27B.
        sliding_window: W, keys a local layer sees, the query itself included.
        global_every: every `global_every`-th layer is global (1-based), so
            layer i is global when (i + 1) % global_every == 0.
        local_rope_base: RoPE base on local layers.
        global_rope_base: RoPE base on global layers.
        global_rope_scale: linear position scaling factor on global layers.
        norm_eps: RMSNorm epsilon.
        max_seq_len: the longest context the checkpoint was trained for.
        name: a short label, e.g. "gemma3-270m".
    """

    vocab_size: int
    width: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    query_pre_attn_scalar: float
    sliding_window: int
    global_every: int = 6
    local_rope_base: float = 10_000.0
    global_rope_base: float = 1_000_000.0
    global_rope_scale: float = 1.0
    norm_eps: float = 1e-6
    max_seq_len: int = 32_768
    name: str = "gemma3"

    def __post_init__(self):
        positive = (
            "vocab_size",
            "width",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "mlp_dim",
            "sliding_window",
            "global_every",
        )
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"TransformerConfig.{field} must be a positive int, "
                    f"got {value!r}"
                )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TransformerConfig.num_heads ({self.num_heads}) must be a "
                f"multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"TransformerConfig.head_dim must be even for RoPE, "
                f"got {self.head_dim}"
            )

    @property
    def attention_kinds(self) -> tuple[AttentionKind, ...]:
        """The kind of each layer, in order."""
        return tuple(
            AttentionKind.GLOBAL
            if (i + 1) % self.global_every == 0
            else AttentionKind.LOCAL
            for i in range(self.num_layers)
        )

    @property
    def global_layers(self) -> tuple[int, ...]:
        """Indices of the global layers."""
        kinds = self.attention_kinds
        return tuple(
            i for i, k in enumerate(kinds) if k is AttentionKind.GLOBAL
        )

    def rope(self, kind: AttentionKind) -> tuple[float, float]:
        """Returns (base, position scale) of RoPE for a layer kind."""
        if kind is AttentionKind.GLOBAL:
            return self.global_rope_base, self.global_rope_scale
        return self.local_rope_base, 1.0


GEMMA3_270M = TransformerConfig(
    vocab_size=262_144,
    width=640,
    num_layers=18,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=2048,
    query_pre_attn_scalar=256,
    sliding_window=512,
    name="gemma3-270m",
)

GEMMA3_1B = TransformerConfig(
    vocab_size=262_144,
    width=1152,
    num_layers=26,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    mlp_dim=6912,
    query_pre_attn_scalar=256,
    sliding_window=512,
    name="gemma3-1b",
)

GEMMA3_4B = TransformerConfig(
    vocab_size=262_208,
    width=2560,
    num_layers=34,
    num_heads=8,
    num_kv_heads=4,
    head_dim=256,
    mlp_dim=10_240,
    query_pre_attn_scalar=256,
    sliding_window=1024,
    global_rope_scale=8.0,
    max_seq_len=131_072,
    name="gemma3-4b",
)

GEMMA3_12B = TransformerConfig(
    vocab_size=262_208,
    width=3840,
    num_layers=48,
    num_heads=16,
    num_kv_heads=8,
    head_dim=256,
    mlp_dim=15_360,
    query_pre_attn_scalar=256,
    sliding_window=1024,
    global_rope_scale=8.0,
    max_seq_len=131_072,
    name="gemma3-12b",
)

GEMMA3_27B = TransformerConfig(
    vocab_size=262_208,
    width=5376,
    num_layers=62,
    num_heads=32,
    num_kv_heads=16,
    head_dim=128,
    mlp_dim=21_504,
    query_pre_attn_scalar=168,
    sliding_window=1024,
    global_rope_scale=8.0,
    max_seq_len=131_072,
    name="gemma3-27b",
)

PRESETS: dict[str, TransformerConfig] = {
    c.name: c
    for c in (GEMMA3_270M, GEMMA3_1B, GEMMA3_4B, GEMMA3_12B, GEMMA3_27B)
}
"""The one registry of named presets, keyed by `TransformerConfig.name`."""


def preset(name: str) -> TransformerConfig:
    """Returns the preset called `name`, e.g. "gemma3-1b".

    Raises:
        KeyError: `name` is not one of `PRESETS`.
    """
    if name not in PRESETS:
        raise KeyError(
            f"preset {name!r} is unknown; expected one of {sorted(PRESETS)}"
        )
    return PRESETS[name]
