"""Tiny configurations and helpers for fast unit tests.

`TINY_CONFIG` keeps every architecture detail of Gemma 3 (grouped-query
attention, local and global layers, a small window, a query scale different
from the head dim, position scaling on global layers) at a size that runs in
milliseconds on a CPU.
"""

from __future__ import annotations

from flax import nnx

from gemma_lab.config import TransformerConfig
from gemma_lab.model import Transformer
from gemma_lab.tokenizer import check_utf8

TINY_CONFIG = TransformerConfig(
    vocab_size=512,
    width=64,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    mlp_dim=128,
    query_pre_attn_scalar=24,
    sliding_window=8,
    global_every=2,
    global_rope_scale=8.0,
    max_seq_len=256,
    name="tiny",
)


def tiny_model(seed: int = 0, **kwargs) -> Transformer:
    """A randomly initialised `Transformer` with `TINY_CONFIG`.

    Norm scales are randomised too, so tests see their effect.
    """
    model = Transformer(TINY_CONFIG, rngs=nnx.Rngs(seed), **kwargs)
    rngs = nnx.Rngs(seed + 1)
    for path, param in nnx.iter_graph(model):
        del path
        if isinstance(param, nnx.Param) and param[...].ndim == 1:
            param[...] = 0.1 * nnx.initializers.normal(1.0)(
                rngs.params(), param[...].shape, param[...].dtype
            )
    return model


class CharTokenizer:
    """A stand-in tokenizer for the tiny model: one id per character.

    A character c becomes 3 + (code point of c mod 400), inside
    `TINY_CONFIG.vocab_size`; BOS is 2, EOS 1, `<start_of_turn>` 105 and
    `<end_of_turn>` 106, as in Gemma 3. Only for tests that exercise code
    around a tokenizer.
    """

    bos_id, eos_id, start_of_turn_id, end_of_turn_id = 2, 1, 105, 106

    def encode(
        self, text: str, add_bos: bool = True, special: bool = True
    ) -> list[int]:
        del special  # Every character is plain text.
        check_utf8(text)  # As `Tokenizer.encode`.
        ids = [3 + (ord(c) % 400) for c in text]
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids) -> str:
        return "".join(chr(i - 3) for i in ids)
