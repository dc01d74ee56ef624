"""Loading SigLIP vision weights stored under HF transformers' names.

HF's SigLIP vision tower names its tensors `embeddings.patch_embedding...`,
`encoder.layers.{i}.self_attn.q_proj...` and `post_layernorm...`, under a
prefix that depends on where it sits: none in transformers 5's
`SiglipVisionModel`, `vision_model.` in transformers 4's, and
`vision_tower.vision_model.` in Gemma 3's released safetensors
(`vision_tower.` when transformers 5 saves a Gemma 3 model). The prefix
is found from the patch-embedding key unless given. PyTorch `Linear`
weights are [out, in] and are transposed to [in, out] kernels; the patch
convolution [D, 3, p, p] becomes a [(p p 3), D] kernel. The optional
attention-pooling `head` is not part of `VisionEncoder` (Gemma 3 has none),
so a state dict that holds one is rejected rather than partly loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from gemma_lab.checkpoints.rules import same, transpose
from gemma_lab.vision.encoder import VisionEncoder
from gemma_lab.vision.weights import (
    NameRule,
    assign_params,
    patch_kernel,
    rename,
)

GEMMA3_PREFIX = "vision_tower.vision_model."
_ANCHOR = "embeddings.patch_embedding.weight"

_EMB = r"embeddings\."
_LAYER = r"encoder\.layers\.(\d+)\."
_PROJECTIONS = {"q": "query", "k": "key", "v": "value", "out": "output"}

# Stored name (prefix removed) -> encoder parameter path.
SIGLIP_RULES: tuple[NameRule, ...] = (
    (_EMB + r"patch_embedding\.weight", "patch_embedding.kernel", patch_kernel),
    (_EMB + r"patch_embedding\.bias", "patch_embedding.bias", same),
    (_EMB + r"position_embedding\.weight", "position_embedding", same),
    (_LAYER + r"layer_norm1\.weight", "blocks.{0}.attention_norm.scale", same),
    (_LAYER + r"layer_norm1\.bias", "blocks.{0}.attention_norm.bias", same),
    *(
        rule
        for short, ours in _PROJECTIONS.items()
        for rule in (
            (
                _LAYER + rf"self_attn\.{short}_proj\.weight",
                f"blocks.{{0}}.attention.{ours}.kernel",
                transpose,
            ),
            (
                _LAYER + rf"self_attn\.{short}_proj\.bias",
                f"blocks.{{0}}.attention.{ours}.bias",
                same,
            ),
        )
    ),
    (_LAYER + r"layer_norm2\.weight", "blocks.{0}.mlp_norm.scale", same),
    (_LAYER + r"layer_norm2\.bias", "blocks.{0}.mlp_norm.bias", same),
    (
        _LAYER + r"mlp\.(fc1|fc2)\.weight",
        "blocks.{0}.mlp.{1}.kernel",
        transpose,
    ),
    (_LAYER + r"mlp\.(fc1|fc2)\.bias", "blocks.{0}.mlp.{1}.bias", same),
    (r"post_layernorm\.weight", "final_norm.scale", same),
    (r"post_layernorm\.bias", "final_norm.bias", same),
)


def siglip_params_from_hf(
    state_dict: Mapping[str, object], *, prefix: str | None = None
) -> dict[str, np.ndarray]:
    """Renames and converts SigLIP vision weights to encoder parameters.

    Args:
        state_dict: stored name -> tensor (torch tensor, numpy or JAX array);
            keys that do not start with `prefix` are ignored, so a whole
            Gemma 3 checkpoint can be passed.
        prefix: the vision tower's key prefix, e.g. `GEMMA3_PREFIX`; by
            default whatever precedes the one key ending in
            "embeddings.patch_embedding.weight".

    Returns:
        parameter path (as `gemma_lab.vision.weights.param_shapes`) -> numpy
        array, ready for `assign_params`.

    Raises:
        ValueError: if the prefix cannot be found, no key starts with it, or
            some key under it has no rule (e.g. the pooling `head`); all such
            keys are listed.
    """
    stored = _select(state_dict, prefix)
    params, unmatched = rename(stored, SIGLIP_RULES)
    if unmatched:
        raise ValueError(
            f"state_dict keys under {prefix!r} without a rule: {unmatched}."
        )
    return params


def load_siglip_from_hf(
    encoder: VisionEncoder,
    state_dict: Mapping[str, object],
    *,
    prefix: str | None = None,
) -> None:
    """Fills `encoder` with SigLIP weights from an HF state dict, or raises.

    Args:
        encoder: a `VisionEncoder` with a SigLIP config (no class token, no
            layer scale); it may be abstract (`nnx.eval_shape`).
        state_dict: as for `siglip_params_from_hf`.
        prefix: as for `siglip_params_from_hf`.

    Raises:
        ValueError: listing keys without a rule, encoder parameters not
            provided and shape mismatches; nothing is assigned then.

    >>> import transformers
    >>> from flax import nnx
    >>> from gemma_lab.vision.config import ViTConfig
    >>> hf = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
    ...     hidden_size=8, intermediate_size=16, num_hidden_layers=1,
    ...     num_attention_heads=2, image_size=28, patch_size=14,
    ...     vision_use_head=False))
    >>> config = ViTConfig(image_size=28, patch_size=14, width=8, depth=1,
    ...                    num_heads=2, mlp_dim=16, num_positions=4)
    >>> encoder = VisionEncoder(config, rngs=nnx.Rngs(0))
    >>> load_siglip_from_hf(encoder, hf.state_dict())
    """
    stored = _select(state_dict, prefix)
    params, unmatched = rename(stored, SIGLIP_RULES)
    assign_params(encoder, params, unmatched=unmatched, source="state_dict")


def _select(state_dict: Mapping[str, object], prefix: str | None) -> dict:
    """Arrays under `prefix` (found when None), keyed without it."""
    if prefix is None:
        prefix = _find_prefix(state_dict)
    stored = {
        key[len(prefix) :]: _to_numpy(value)
        for key, value in state_dict.items()
        if key.startswith(prefix)
    }
    if not stored:
        sample = sorted(state_dict)[:5]
        raise ValueError(
            f"No state_dict key starts with prefix={prefix!r}; keys begin "
            f"like {sample}."
        )
    return stored


def _find_prefix(state_dict: Mapping[str, object]) -> str:
    anchors = [key for key in state_dict if key.endswith(_ANCHOR)]
    if len(anchors) != 1:
        raise ValueError(
            f"state_dict has {len(anchors)} keys ending in {_ANCHOR!r} "
            f"({anchors}); expected one. Pass prefix= explicitly."
        )
    return anchors[0][: -len(_ANCHOR)]


def _to_numpy(value) -> np.ndarray:
    """A torch tensor (bfloat16 widened to float32) or array as numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)
