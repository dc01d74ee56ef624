"""Loading Gemma 3 from a GGUF file (llama.cpp's format).

The file is read with the `gguf` package, which also dequantises every tensor
type (Q4_K, Q5_0, Q6_K, Q8_0, F32, ...). The architecture comes from the
file's metadata (`gemma3.*` keys); the tensor names map through
`gemma_lab.checkpoints.rules.GGUF_RULES`; the vocabulary becomes a
`gemma_lab.Tokenizer`.

Opening a GGUF file parses its 262,144-entry vocabulary (about 30 s) and
dequantising takes about 15 s more, so the converted weights, the config and
the tokenizer model are cached on disk (see `gemma_lab.checkpoints.cache`),
keyed by the file's hash: later loads read the cache and never open the GGUF.

Quantised 2-D tensors are also kept in an exact 8-bit form (see
`gemma_lab.checkpoints.gguf_blocks` and `gemma_lab.packed`), which one-token
decoding reads instead of the float32 weights.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib

import gguf
import numpy as np
from tqdm.auto import tqdm

from gemma_lab.checkpoints import cache
from gemma_lab.checkpoints.gguf_blocks import PACKABLE, split_blocks
from gemma_lab.checkpoints.rules import (
    GGUF_RULES,
    CheckpointError,
    rename,
    target_paths,
)
from gemma_lab.config import PRESETS, TransformerConfig
from gemma_lab.packed import PackedMatrix
from gemma_lab.tokenizer import Tokenizer

_CACHE_VERSION = "gguf-4"
_PACKED = "packed:"  # Prefix of packed arrays in a cache entry.


def open_gguf(path: os.PathLike) -> gguf.GGUFReader:
    """Opens a GGUF file, with a clear error for a missing or broken file."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # The reader raises several types on bad bytes.
        raise CheckpointError(
            f"{str(path)!r} is not a readable GGUF file (truncated or "
            f"corrupted?): {type(e).__name__}: {e}"
        ) from e


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_gguf(
    reader: gguf.GGUFReader, *, source: str = "GGUF"
) -> TransformerConfig:
    """The architecture stored in a GGUF file's metadata.

    `query_pre_attn_scalar` is not stored in GGUF; it is taken from the preset
    of the same width and depth, else set to the head dim (true for every
    Gemma 3 size but 27B).

    Raises:
        CheckpointError: the file is not a Gemma 3 model.
    """
    arch = _field(reader, "general.architecture")
    if arch != "gemma3":
        raise CheckpointError(
            f"{source}: architecture {arch!r} is not supported; expected "
            f"'gemma3'"
        )
    a = "gemma3."
    required = [
        "embedding_length",
        "block_count",
        "feed_forward_length",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.sliding_window",
    ]
    missing = [k for k in required if _field(reader, a + k) is None]
    if missing:
        raise CheckpointError(f"{source}: metadata lacks {missing}")
    width = int(_field(reader, a + "embedding_length"))
    heads = int(_field(reader, a + "attention.head_count"))
    layers = int(_field(reader, a + "block_count"))
    head_dim = int(_field(reader, a + "attention.key_length", width // heads))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    embedding = next(t for t in reader.tensors if t.name == "token_embd.weight")
    vocab = int(embedding.shape[-1]) if tokens is None else len(tokens.data)

    scalar = float(head_dim)
    for preset in PRESETS.values():
        if (preset.width, preset.num_layers) == (width, layers):
            scalar = preset.query_pre_attn_scalar
    scale = 1.0
    if _field(reader, a + "rope.scaling.type") == "linear":
        scale = float(_field(reader, a + "rope.scaling.factor", 1.0))

    return TransformerConfig(
        vocab_size=vocab,
        width=width,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(_field(reader, a + "attention.head_count_kv")),
        head_dim=head_dim,
        mlp_dim=int(_field(reader, a + "feed_forward_length")),
        query_pre_attn_scalar=scalar,
        sliding_window=int(_field(reader, a + "attention.sliding_window")),
        global_rope_base=float(_field(reader, a + "rope.freq_base", 1e6)),
        global_rope_scale=scale,
        norm_eps=float(
            _field(reader, a + "attention.layer_norm_rms_epsilon", 1e-6)
        ),
        max_seq_len=int(_field(reader, a + "context_length", 32_768)),
        name=_preset_name(width, layers) or f"gemma3-gguf-{width}x{layers}",
    )


def _preset_name(width: int, layers: int) -> str | None:
    for name, preset in PRESETS.items():
        if (preset.width, preset.num_layers) == (width, layers):
            return name
    return None


def dequantize_tensors(
    reader: gguf.GGUFReader, *, source: str, progress: bool = True
) -> dict[str, np.ndarray]:
    """Every tensor of the file as a float32 array in PyTorch layout.

    Raises:
        CheckpointError: a tensor type the `gguf` package cannot dequantise,
            or data that does not fit its declared shape.
    """
    arrays = {}
    for tensor in tqdm(
        reader.tensors, desc="Dequantizing GGUF", disable=not progress
    ):
        kind = gguf.GGMLQuantizationType(tensor.tensor_type)
        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            values = gguf.quants.dequantize(tensor.data, kind)
            arrays[tensor.name] = values.astype(np.float32).reshape(shape)
        except NotImplementedError as e:
            raise CheckpointError(
                f"{source}: tensor {tensor.name!r} has type {kind.name}, "
                f"which cannot be dequantized: {e}"
            ) from e
        except ValueError as e:
            raise CheckpointError(
                f"{source}: tensor {tensor.name!r} ({kind.name}) does not fit "
                f"shape {shape}; is the file truncated? {e}"
            ) from e
    return arrays


def packed_tensors(reader: gguf.GGUFReader) -> dict[str, PackedMatrix]:
    """{module path: PackedMatrix} for the file's quantised 2-D tensors.

    Module paths are the parameter paths of `GGUF_RULES` without the last
    name ("layers.0.mlp.up_proj", "embedder").
    """
    kinds = {
        t.name: t
        for t in reader.tensors
        if t.tensor_type in PACKABLE and len(t.shape) == 2
    }
    packed = {}
    for name, path in target_paths(kinds, GGUF_RULES).items():
        tensor = kinds[name]
        shape = tuple(int(d) for d in reversed(tensor.shape))
        kind = gguf.GGMLQuantizationType(tensor.tensor_type)
        packed[path.rsplit(".", 1)[0]] = split_blocks(tensor.data, kind, shape)
    return packed


def read_gguf(
    path: os.PathLike, *, use_cache: bool = True, progress: bool = True
) -> tuple[
    TransformerConfig,
    dict[str, np.ndarray],
    list[str],
    Tokenizer,
    dict[str, PackedMatrix],
]:
    """Reads config, parameters, tokenizer and packed weights from a GGUF file.

    Returns:
        (config, {parameter path: float32 array}, unmatched tensor names,
        tokenizer, {module path: PackedMatrix}).

    Raises:
        FileNotFoundError: `path` does not exist.
        CheckpointError: the file is unreadable, not Gemma 3, or holds a
            tensor type that cannot be dequantised.
    """
    source = str(path)
    if not pathlib.Path(path).is_file():
        raise FileNotFoundError(f"GGUF file {source!r} does not exist")
    digest = cache.file_digest(path) if use_cache else None
    if use_cache:
        hit = _read_cache(digest)
        if hit is not None:
            return hit

    reader = open_gguf(path)
    config = config_from_gguf(reader, source=source)
    tokenizer = Tokenizer.from_gguf_reader(reader)
    named = dequantize_tensors(reader, source=source, progress=progress)
    params, unmatched = rename(named, GGUF_RULES)
    packed = packed_tensors(reader)
    if use_cache and not unmatched:
        _write_cache(digest, config, params, tokenizer, packed, source)
    return config, params, unmatched, tokenizer, packed


def _read_cache(digest: str):
    tokenizer_path = cache.cache_dir() / f"{digest}.tokenizer.model"
    cached = cache.load_cached(digest, _CACHE_VERSION)
    if cached is None or not tokenizer_path.is_file():
        return None
    arrays, info = cached
    try:
        tokenizer = Tokenizer.from_file(tokenizer_path)
        config = TransformerConfig(**info["config"])
    except (ValueError, KeyError, TypeError):
        return None
    params = {k: v for k, v in arrays.items() if not k.startswith(_PACKED)}
    packed = {
        path: PackedMatrix(
            *(arrays.get(f"{_PACKED}{path}:{part}") for part in _PARTS)
        )
        for path in info.get("packed", [])
    }
    return config, params, [], tokenizer, packed


_PARTS = ("values", "scale", "offset")


def _write_cache(digest, config, params, tokenizer, packed, source) -> None:
    # The tokenizer goes first: the weights file marks a complete entry.
    tokenizer_path = cache.cache_dir() / f"{digest}.tokenizer.model"
    cache.atomic_write_bytes(tokenizer.serialized_model(), tokenizer_path)
    info = {
        "source": os.path.basename(source),
        "config": dataclasses.asdict(config),
        "packed": sorted(packed),
    }
    arrays = dict(params)
    for path, matrix in packed.items():
        for part in _PARTS:
            if getattr(matrix, part) is not None:
                arrays[f"{_PACKED}{path}:{part}"] = getattr(matrix, part)
    cache.store_cached(digest, _CACHE_VERSION, arrays, info)
