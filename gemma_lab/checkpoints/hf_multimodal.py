"""Loading Gemma 3 multimodal checkpoints (4B, 12B, 27B) from safetensors.

A folder downloaded with `huggingface-cli download google/gemma-3-4b-it`
holds `config.json` (a `text_config`, a `vision_config` and the image token
settings), `tokenizer.model` and sharded safetensors. Its tensors come in
three parts, under prefixes that differ between transformers versions:

    text model    model.language_model.*  or  language_model.model.*
    vision tower  model.vision_tower.vision_model.*  or  vision_tower.*
                  (or vision_tower.vision_model.*)
    projector     model.multi_modal_projector.*  or  multi_modal_projector.*

The text part goes through the Hugging Face text rules
(`gemma_lab.checkpoints.hf`), the vision tower through the SigLIP rules
(`gemma_lab.checkpoints.hf_siglip`), and the projector through the two rules
below. `mm_input_projection_weight` is stored [E, D], already the layout of
a gemma_lab kernel, so it is not transposed. Text-only use of the same
folder needs none of this: `gemma_lab.load(folder)` drops the vision parts.
"""

from __future__ import annotations

import os
import pathlib
import re

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_lab.checkpoints.hf import (
    read_config,
    read_tensors,
    safetensors_files,
    text_tensors,
)
from gemma_lab.checkpoints.hf_siglip import siglip_params_from_hf
from gemma_lab.checkpoints.rules import (
    HF_RULES,
    CheckpointError,
    build_model,
    rename,
)
from gemma_lab.multimodal import Gemma3Multimodal, ImageTokenIds
from gemma_lab.tokenizer import Tokenizer
from gemma_lab.vision.config import ViTConfig
from gemma_lab.vision.encoder import VisionEncoder
from gemma_lab.vision.projector import MultimodalProjector
from gemma_lab.vision.weights import assign_params

_VISION = re.compile(r"^(model\.)?vision_tower\.")
_PROJECTOR = re.compile(r"^(model\.)?multi_modal_projector\.(.+)$")
PROJECTOR_RULES = {
    "mm_input_projection_weight": "projection.kernel",
    "mm_soft_emb_norm.weight": "norm.scale",
}
"""Stored projector names (prefix removed) -> `MultimodalProjector` paths."""

# transformers' SiglipVisionConfig defaults, for keys config.json omits.
_SIGLIP_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    image_size=224,
    patch_size=16,
    layer_norm_eps=1e-6,
    hidden_act="gelu_pytorch_tanh",
)
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}


def vision_config_from_hf(raw: dict, *, source: str) -> ViTConfig:
    """The SigLIP `ViTConfig` of a Gemma 3 config.json dict.

    Raises:
        CheckpointError: no `vision_config`, or an unsupported activation.
    """
    vision = raw.get("vision_config")
    if not isinstance(vision, dict):
        raise CheckpointError(
            f"{source}: no vision_config; expected a multimodal Gemma 3 "
            "config (text-only checkpoints load with gemma_lab.load)"
        )
    v = {**_SIGLIP_DEFAULTS, **vision}
    if v["hidden_act"] not in _ACTIVATIONS:
        raise CheckpointError(
            f"{source}: vision hidden_act {v['hidden_act']!r}; expected one "
            f"of {sorted(_ACTIVATIONS)}"
        )
    grid = v["image_size"] // v["patch_size"]
    return ViTConfig(
        image_size=v["image_size"],
        patch_size=v["patch_size"],
        width=v["hidden_size"],
        depth=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        mlp_dim=v["intermediate_size"],
        num_positions=grid * grid,
        layer_norm_eps=v["layer_norm_eps"],
        mlp_activation=_ACTIVATIONS[v["hidden_act"]],
    )


def image_ids_from_hf(raw: dict) -> ImageTokenIds:
    """The image token ids of a Gemma 3 config.json dict."""
    return ImageTokenIds(
        start=raw.get("boi_token_index", raw.get("boi_token_id", 255_999)),
        end=raw.get("eoi_token_index", raw.get("eoi_token_id", 256_000)),
        soft=raw.get("image_token_index", raw.get("image_token_id", 262_144)),
    )


def split_tensors(
    named: dict[str, np.ndarray],
) -> tuple[dict, dict, dict]:
    """(text, vision, projector) tensors; projector names lose their prefix.

    Text names keep their prefix (see `gemma_lab.checkpoints.hf`); vision
    names keep theirs, which the SigLIP loader finds by itself.
    """
    vision, projector = {}, {}
    for name, array in named.items():
        found = _PROJECTOR.match(name)
        if found:
            projector[found.group(2)] = array
        elif _VISION.match(name):
            vision[name] = array
    return text_tensors(named), vision, projector


def read_multimodal(
    folder: os.PathLike,
    *,
    with_encoder: bool = True,
    param_dtype=jnp.float32,
    dtype=jnp.float32,
) -> Gemma3Multimodal:
    """Builds a `Gemma3Multimodal` from a Hugging Face multimodal folder.

    Args:
        folder: holds config.json and the safetensors weights.
        with_encoder: False skips the vision tower (encoder None), for use
            with precomputed features.
        param_dtype: dtype of the stored parameters.
        dtype: compute dtype.

    Returns:
        The model, all of its parameters loaded.

    Raises:
        FileNotFoundError: the folder or its weights are missing.
        CheckpointError: the config or tensors do not fit; all mismatches
            are listed, and nothing is built.
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} not found")
    text_config, raw = read_config(folder)
    vision_config = vision_config_from_hf(raw, source=str(folder))
    tokens_out = raw.get("mm_tokens_per_image", 256)

    text, vision, projected = split_tensors(
        read_tensors(safetensors_files(folder))
    )
    # The small parts first, so that a misfit fails before the big one.
    kw = dict(param_dtype=param_dtype, dtype=dtype)
    projector = _projector(
        projected,
        vision_config,
        text_config.width,
        tokens_out,
        source=str(folder),
        **kw,
    )
    encoder = None
    if with_encoder:
        encoder = _encoder(vision, vision_config, source=str(folder), **kw)

    params, unmatched = rename(text, HF_RULES)
    language_model = build_model(
        text_config, params, source=str(folder), unmatched=unmatched, **kw
    )
    return Gemma3Multimodal(
        language_model, projector, encoder, image_ids=image_ids_from_hf(raw)
    )


def load_multimodal(
    folder: os.PathLike, **kwargs
) -> tuple[Gemma3Multimodal, Tokenizer]:
    """`read_multimodal` plus the folder's `tokenizer.model`.

    >>> model, tokenizer = load_multimodal("gemma-3-4b-it")  # doctest: +SKIP
    """
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {str(folder)!r} does not exist; expected a "
            "Hugging Face folder with config.json, tokenizer.model and "
            "safetensors weights"
        )
    tokenizer = Tokenizer.from_file(folder / "tokenizer.model")
    return read_multimodal(folder, **kwargs), tokenizer


def _projector(
    stored, vision_config, text_width, tokens_out, *, source, **kw
) -> MultimodalProjector:
    params = {PROJECTOR_RULES.get(k, k): v for k, v in stored.items()}
    projector = MultimodalProjector(
        vision_config.width,
        text_width,
        tokens_out=tokens_out,
        eps=vision_config.layer_norm_eps,
        rngs=nnx.Rngs(0),
        **kw,
    )
    _assign(projector, params, source=f"{source} (multi_modal_projector)")
    return projector


def _encoder(stored, vision_config, *, source, **kw) -> VisionEncoder:
    if not stored:
        raise CheckpointError(
            f"{source}: no vision_tower tensors; pass with_encoder=False "
            "to load without the encoder"
        )
    encoder = nnx.eval_shape(
        lambda: VisionEncoder(vision_config, rngs=nnx.Rngs(0), **kw)
    )
    try:
        params = siglip_params_from_hf(stored)
        assign_params(encoder, params, source=f"{source} (vision_tower)")
    except ValueError as e:
        raise CheckpointError(str(e)) from e
    return encoder


def _assign(module: nnx.Module, params: dict, *, source: str) -> None:
    """Sets every parameter of a small module, or raises listing misfits."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    expected = {".".join(map(str, p)): v.get_value() for p, v in flat}
    problems = [
        f"{k}: file {np.shape(params[k])}, model {expected[k].shape}"
        for k in sorted(set(expected) & set(params))
        if tuple(np.shape(params[k])) != expected[k].shape
    ]
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected))
    if problems or missing or extra:
        raise CheckpointError(
            f"{source} does not fit: shape mismatches {problems}, missing "
            f"{missing}, unknown {extra}"
        )
    for path, var in flat:
        value = params[".".join(map(str, path))]
        var.set_value(jnp.asarray(value, var.get_value().dtype))
