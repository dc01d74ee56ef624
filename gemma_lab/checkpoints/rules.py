"""Name rules from stored tensor names to the `Transformer` parameter tree.

A rule is a regular expression over a stored name, the parameter path it
fills (with `{0}` for the layer index) and a transform of the stored array.
Each format has one table; `assign` applies a table to a dict of named arrays
and builds a model, or raises `CheckpointError` listing what did not match,
both ways, before any parameter is set. There is never a partial load.

Conventions undone here:
- Hugging Face stores projections as [out, in]; gemma_lab kernels are [in, out].
- llama.cpp (GGUF) stores RMSNorm weights with the 1 already added; gemma_lab,
  like the reference, stores the offset from 1.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_lab.config import TransformerConfig
from gemma_lab.model import Transformer


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded, with the reason and names."""


Transform = Callable[[np.ndarray], np.ndarray]


def same(x: np.ndarray) -> np.ndarray:
    """Keeps a stored array as it is."""
    return x


def transpose(x: np.ndarray) -> np.ndarray:
    """[out, in] (PyTorch Linear) -> [in, out] kernel."""
    return np.ascontiguousarray(x.T)


def _minus_one(x: np.ndarray) -> np.ndarray:
    return x - np.asarray(1, x.dtype)


Rule = tuple[str, str | None, Transform]

_LAYER = r"layers\.(\d+)\."
_HF_LAYER_RULES: list[Rule] = [
    (_LAYER + r"input_layernorm\.weight", "pre_attention_norm.scale", same),
    (
        _LAYER + r"post_attention_layernorm\.weight",
        "post_attention_norm.scale",
        same,
    ),
    (
        _LAYER + r"pre_feedforward_layernorm\.weight",
        "pre_mlp_norm.scale",
        same,
    ),
    (
        _LAYER + r"post_feedforward_layernorm\.weight",
        "post_mlp_norm.scale",
        same,
    ),
    (_LAYER + r"self_attn\.q_proj\.weight", "attn.q_proj.kernel", transpose),
    (_LAYER + r"self_attn\.k_proj\.weight", "attn.k_proj.kernel", transpose),
    (_LAYER + r"self_attn\.v_proj\.weight", "attn.v_proj.kernel", transpose),
    (_LAYER + r"self_attn\.o_proj\.weight", "attn.o_proj.kernel", transpose),
    (_LAYER + r"self_attn\.q_norm\.weight", "attn.q_norm.scale", same),
    (_LAYER + r"self_attn\.k_norm\.weight", "attn.k_norm.scale", same),
    (_LAYER + r"mlp\.gate_proj\.weight", "mlp.gate_proj.kernel", transpose),
    (_LAYER + r"mlp\.up_proj\.weight", "mlp.up_proj.kernel", transpose),
    (_LAYER + r"mlp\.down_proj\.weight", "mlp.down_proj.kernel", transpose),
]

HF_RULES: list[Rule] = [
    (r"embed_tokens\.weight", "embedder.embedding", same),
    (r"norm\.weight", "final_norm.scale", same),
    *[(p, "layers.{0}." + t, f) for p, t, f in _HF_LAYER_RULES],
]
"""Hugging Face Gemma 3 names, after the text-model prefix is removed."""

_BLK = r"blk\.(\d+)\."
GGUF_RULES: list[Rule] = [
    (r"token_embd\.weight", "embedder.embedding", same),
    (r"output_norm\.weight", "final_norm.scale", _minus_one),
    (
        _BLK + r"attn_norm\.weight",
        "layers.{0}.pre_attention_norm.scale",
        _minus_one,
    ),
    (
        _BLK + r"post_attention_norm\.weight",
        "layers.{0}.post_attention_norm.scale",
        _minus_one,
    ),
    (_BLK + r"ffn_norm\.weight", "layers.{0}.pre_mlp_norm.scale", _minus_one),
    (
        _BLK + r"post_ffw_norm\.weight",
        "layers.{0}.post_mlp_norm.scale",
        _minus_one,
    ),
    (_BLK + r"attn_q\.weight", "layers.{0}.attn.q_proj.kernel", transpose),
    (_BLK + r"attn_k\.weight", "layers.{0}.attn.k_proj.kernel", transpose),
    (_BLK + r"attn_v\.weight", "layers.{0}.attn.v_proj.kernel", transpose),
    (
        _BLK + r"attn_output\.weight",
        "layers.{0}.attn.o_proj.kernel",
        transpose,
    ),
    (_BLK + r"attn_q_norm\.weight", "layers.{0}.attn.q_norm.scale", _minus_one),
    (_BLK + r"attn_k_norm\.weight", "layers.{0}.attn.k_norm.scale", _minus_one),
    (_BLK + r"ffn_gate\.weight", "layers.{0}.mlp.gate_proj.kernel", transpose),
    (_BLK + r"ffn_up\.weight", "layers.{0}.mlp.up_proj.kernel", transpose),
    (_BLK + r"ffn_down\.weight", "layers.{0}.mlp.down_proj.kernel", transpose),
]
"""llama.cpp's GGUF names for Gemma 3 (architecture "gemma3")."""


def rename(
    named: Mapping[str, np.ndarray], rules: Sequence[Rule]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """Renames and transforms stored arrays through the first matching rule.

    Args:
        named: stored name -> array.
        rules: `(pattern, target, transform)` tried in order; a pattern must
            match the whole name, `{0}`, `{1}` in the target stand for its
            groups, and a target of None drops the name on purpose.

    Returns:
        ({parameter path: transformed array}, sorted stored names no rule
        matched).

    Raises:
        CheckpointError: two stored names map to the same parameter.
    """
    params, unmatched = {}, []
    for name, array in named.items():
        found = _match(name, rules)
        if found is None:
            unmatched.append(name)
            continue
        path, transform = found
        if path is None:
            continue
        if path in params:
            raise CheckpointError(f"two stored names map to {path!r}")
        params[path] = transform(np.asarray(array))
    return params, sorted(unmatched)


def target_paths(names: Iterable[str], rules: Sequence[Rule]) -> dict[str, str]:
    """{stored name: parameter path} for the names a rule maps to a path."""
    paths = {}
    for name in names:
        found = _match(name, rules)
        if found is not None and found[0] is not None:
            paths[name] = found[0]
    return paths


def _match(name: str, rules: Sequence[Rule]):
    """(parameter path or None, transform) of the first rule matching name."""
    for pattern, target, transform in rules:
        match = re.fullmatch(pattern, name)
        if match:
            path = None if target is None else target.format(*match.groups())
            return path, transform
    return None


def _expected(config: TransformerConfig) -> dict[str, tuple[int, ...]]:
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    flat = nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    return {
        ".".join(str(k) for k in path): tuple(v.get_value().shape)
        for path, v in flat
    }


def check_params(
    config: TransformerConfig,
    params: Mapping[str, np.ndarray],
    *,
    source: str,
    unmatched: list[str] = (),
) -> None:
    """Raises `CheckpointError` unless `params` fill the model exactly.

    The message lists stored names no rule matched, parameters the file does
    not provide, and shape mismatches with both shapes.
    """
    expected = _expected(config)
    missing = sorted(set(expected) - set(params))
    extra = sorted(set(params) - set(expected)) + sorted(unmatched)
    shapes = [
        f"{k}: file {tuple(params[k].shape)}, model {expected[k]}"
        for k in sorted(set(expected) & set(params))
        if tuple(params[k].shape) != expected[k]
    ]
    if missing or extra or shapes:
        parts = [f"weights in {source} do not fit config {config.name!r}"]
        if extra:
            parts.append(f"in the file but not the model: {_clip(extra)}")
        if missing:
            parts.append(f"in the model but not the file: {_clip(missing)}")
        if shapes:
            parts.append(f"shape mismatches: {_clip(shapes)}")
        raise CheckpointError("\n  ".join(parts))


def _clip(names: list[str], most: int = 12) -> str:
    shown = ", ".join(names[:most])
    more = len(names) - most
    return shown + (f" ... and {more} more" if more > 0 else "")


def build_model(
    config: TransformerConfig,
    params: Mapping[str, np.ndarray],
    *,
    source: str,
    param_dtype=jnp.float32,
    dtype=jnp.float32,
    unmatched: list[str] = (),
) -> Transformer:
    """Builds a `Transformer` holding `params`, after `check_params`.

    Args:
        config: the architecture the weights are for.
        params: {parameter path: array}, e.g. "layers.0.attn.q_proj.kernel".
        source: the file or folder named in errors.
        param_dtype: dtype of the stored parameters.
        dtype: compute dtype.
        unmatched: stored names no rule matched (reported as errors).

    Raises:
        CheckpointError: the weights do not fit the config.
    """
    check_params(config, params, source=source, unmatched=unmatched)
    abstract = nnx.eval_shape(
        lambda: Transformer(
            config, rngs=nnx.Rngs(0), param_dtype=param_dtype, dtype=dtype
        )
    )
    graphdef, state = nnx.split(abstract)
    flat = nnx.to_flat_state(state)
    values = []
    for path, variable in flat:
        key = ".".join(str(k) for k in path)
        if key in params:
            array = jnp.asarray(params[key], dtype=param_dtype)
            variable = variable.replace(array)
        values.append((path, variable))
    state = nnx.from_flat_state(values)
    return nnx.merge(graphdef, state)


def model_params(model: Transformer) -> dict[str, jax.Array]:
    """{parameter path: array} of a model, the inverse of `build_model`."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(str(k) for k in path): v.get_value() for path, v in flat}
