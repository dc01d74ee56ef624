"""Loading Gemma 3 from a Hugging Face safetensors folder.

A folder holds `config.json` and either `model.safetensors` or shards listed
in `model.safetensors.index.json`; this is what `huggingface-cli download
google/gemma-3-1b-it` writes. The output head is tied to the embedding, so no
`lm_head` tensor is expected (one that is present is ignored). Multimodal
checkpoints (4B, 12B, 27B) nest the text model under a prefix; text-only use
drops the vision tower and projector here.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import numpy as np
import safetensors

from gemma_lab.checkpoints.rules import HF_RULES, CheckpointError, rename
from gemma_lab.config import TransformerConfig

# Prefixes of the text model in the layouts transformers has written.
_TEXT_PREFIXES = (
    "model.language_model.",
    "language_model.model.",
    "model.",
)
# Parts of multimodal checkpoints that the text model does not use.
_NON_TEXT = re.compile(
    r"^(model\.)?(vision_tower|multi_modal_projector)\.|^lm_head\.weight$"
)


def read_config(folder: os.PathLike) -> tuple[TransformerConfig, dict]:
    """Reads `config.json`; returns the text config and the raw JSON dict."""
    path = pathlib.Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{str(path)!r} does not exist")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON: {e}") from e
    return config_from_hf(raw, source=str(path)), raw


def config_from_hf(raw: dict, *, source: str) -> TransformerConfig:
    """A `TransformerConfig` from a Gemma 3 config.json dict.

    Raises:
        CheckpointError: not a Gemma 3 model, or a layer pattern other than
            "every n-th layer global".
    """
    text = raw.get("text_config", raw)
    model_type = text.get("model_type", raw.get("model_type"))
    if model_type not in ("gemma3_text", "gemma3"):
        raise CheckpointError(
            f"{source}: model_type {model_type!r} is not supported; expected "
            f"'gemma3_text' or 'gemma3'"
        )
    layers = text["num_hidden_layers"]
    every = _global_every(text, layers, source)
    local_base, global_base, scale = _rope(text)
    head_dim = text.get("head_dim", 256)
    return TransformerConfig(
        vocab_size=text.get("vocab_size", 262_208),
        width=text["hidden_size"],
        num_layers=layers,
        num_heads=text["num_attention_heads"],
        num_kv_heads=text.get(
            "num_key_value_heads", text["num_attention_heads"]
        ),
        head_dim=head_dim,
        mlp_dim=text["intermediate_size"],
        query_pre_attn_scalar=text.get("query_pre_attn_scalar", head_dim),
        sliding_window=text.get("sliding_window", 4096),
        global_every=every,
        local_rope_base=local_base,
        global_rope_base=global_base,
        global_rope_scale=scale,
        norm_eps=text.get("rms_norm_eps", 1e-6),
        max_seq_len=text.get("max_position_embeddings", 131_072),
        name=text.get("_name_or_path") or f"hf-gemma3-{layers}",
    )


def _global_every(text: dict, layers: int, source: str) -> int:
    types = text.get("layer_types")
    if types is None:
        return text.get("sliding_window_pattern", 6)
    globals_ = [i for i, t in enumerate(types) if t == "full_attention"]
    every = globals_[0] + 1 if globals_ else layers + 1
    expected = [i for i in range(layers) if (i + 1) % every == 0]
    if globals_ != expected:
        raise CheckpointError(
            f"{source}: layer_types puts global layers at {globals_}; "
            f"gemma_lab supports every n-th layer global"
        )
    return every


def _rope(text: dict) -> tuple[float, float, float]:
    """(local base, global base, global linear scale) from either layout."""
    params = text.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        full, local = params["full_attention"], params["sliding_attention"]
        scale = 1.0
        if full.get("rope_type") == "linear":
            scale = float(full.get("factor", 1.0))
        return (
            float(local.get("rope_theta", 10_000.0)),
            float(full.get("rope_theta", 1_000_000.0)),
            scale,
        )
    scaling = text.get("rope_scaling") or {}
    scale = 1.0
    if scaling.get("rope_type", scaling.get("type")) == "linear":
        scale = float(scaling.get("factor", 1.0))
    return (
        float(text.get("rope_local_base_freq", 10_000.0)),
        float(text.get("rope_theta", 1_000_000.0)),
        scale,
    )


def safetensors_files(folder: os.PathLike) -> list[pathlib.Path]:
    """The weight files of a folder: one file, or the shards of an index."""
    folder = pathlib.Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(
            set(json.loads(index.read_text())["weight_map"].values())
        )
        files = [folder / s for s in shards]
    else:
        files = [folder / "model.safetensors"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"safetensors files missing: {missing}")
    return files


def read_tensors(
    files: list[pathlib.Path], keep=lambda name: True
) -> dict[str, np.ndarray]:
    """Reads the tensors whose names `keep` accepts, as numpy arrays.

    bfloat16 tensors are widened to float32, since numpy has no bfloat16.
    """
    arrays = {}
    for file in files:
        try:
            with safetensors.safe_open(file, framework="flax") as f:
                for name in f.keys():
                    if keep(name):
                        arrays[name] = np.asarray(
                            f.get_tensor(name), np.float32
                        )
        except (OSError, safetensors.SafetensorError) as e:
            raise CheckpointError(
                f"{str(file)!r} is not a readable safetensors file "
                f"(truncated or corrupted?): {e}"
            ) from e
    return arrays


def text_tensors(named: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Strips the text-model prefix from names and drops vision parts."""
    out = {}
    for name, array in named.items():
        if _NON_TEXT.search(name):
            continue
        for prefix in _TEXT_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
                break
        out[name] = array
    return out


def read_hf(
    folder: os.PathLike,
) -> tuple[TransformerConfig, dict[str, np.ndarray], list[str]]:
    """Config and converted text parameters of a Hugging Face folder.

    Returns:
        (config, {parameter path: float32 array}, unmatched tensor names).
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} not found")
    config, _ = read_config(folder)
    named = text_tensors(read_tensors(safetensors_files(folder)))
    params, unmatched = rename(named, HF_RULES)
    return config, params, unmatched
