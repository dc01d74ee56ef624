"""Assigning loaded weights to a `VisionEncoder` through tables of name rules.

Checkpoint loaders (ONNX DINOv2, HF SigLIP) describe how stored names map to
the encoder's parameter tree as a table of *name rules*
`(pattern, target, transform)`: a regular expression that must match the
whole stored name, the target *parameter path* with `{0}`, `{1}` standing
for the pattern's groups (dotted, e.g. "blocks.{0}.attention.query.kernel",
as listed by `param_shapes`), and a transform of the stored array. A target
of None skips a stored name on purpose (a head the encoder does not have).
The same convention as `gemma_lab.checkpoints.rules` for the text model.

Loading is all-or-nothing: any stored name without a rule, any parameter
without a stored array, or any wrong shape raises one `ValueError` listing
them all, before a single value is assigned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_lab.checkpoints.rules import Rule as NameRule
from gemma_lab.checkpoints.rules import rename
from gemma_lab.vision.encoder import VisionEncoder


def patch_kernel(weight: np.ndarray) -> np.ndarray:
    """Conv weight [D, 3, p, p] -> kernel [(p p 3), D], as `patchify`."""
    return weight.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0])


def param_shapes(encoder: VisionEncoder) -> dict[str, tuple[int, ...]]:
    """Dotted parameter paths of an encoder and their shapes.

    Args:
        encoder: a `VisionEncoder`, possibly abstract (`nnx.eval_shape`).

    Returns:
        e.g. {"blocks.0.attention.query.kernel": (D, D), ...}.
    """
    flat = nnx.to_flat_state(nnx.state(encoder, nnx.Param))
    return {_dotted(path): tuple(var.get_value().shape) for path, var in flat}


def assign_params(
    encoder: VisionEncoder,
    params: Mapping[str, np.ndarray],
    *,
    unmatched: Sequence[str] = (),
    source: str = "params",
) -> None:
    """Replaces every parameter of `encoder`, all at once or not at all.

    Args:
        encoder: the module to update in place; it may be abstract (from
            `nnx.eval_shape`).
        params: parameter path (as in `param_shapes`) -> array of that
            shape. Arrays are cast to the encoder's parameter dtype.
        unmatched: stored names no rule matched, reported as errors.
        source: what the arrays came from, named in the error.

    Raises:
        ValueError: listing stored names without a rule, parameters not
            provided, unknown paths and wrong shapes.
    """
    flat = nnx.to_flat_state(nnx.state(encoder, nnx.Param))
    expected = {_dotted(path): var.get_value() for path, var in flat}
    problems = _mismatches(expected, params, unmatched)
    if problems:
        lines = "\n  ".join(problems)
        raise ValueError(f"{source} does not fit the encoder:\n  {lines}")

    updated = []
    for path, var in flat:
        dtype = var.get_value().dtype
        value = jnp.asarray(params[_dotted(path)], dtype)
        updated.append((path, var.replace(value)))
    nnx.update(encoder, nnx.from_flat_state(updated))


def load_with_rules(
    encoder: VisionEncoder,
    stored: Mapping[str, np.ndarray],
    rules: Sequence[NameRule],
    *,
    source: str,
) -> None:
    """`rename` then `assign_params`: a checkpoint into `encoder`, or nothing.

    Args:
        encoder: the module to update in place (possibly abstract).
        stored: checkpoint name -> array.
        rules: `NameRule`s from stored names to `param_shapes` paths.
        source: the file or object named in errors.

    Raises:
        ValueError: as `assign_params`, naming both sides' leftovers.
    """
    params, unmatched = rename(stored, rules)
    assign_params(encoder, params, unmatched=unmatched, source=source)


def _mismatches(expected, params, unmatched) -> list[str]:
    missing = sorted(set(expected) - set(params))
    unknown = sorted(set(params) - set(expected))
    shapes = [
        f"{name}: stored {tuple(np.shape(params[name]))}, encoder "
        f"{tuple(value.shape)}"
        for name, value in sorted(expected.items())
        if name in params and tuple(np.shape(params[name])) != value.shape
    ]
    problems = []
    if unmatched:
        problems.append(f"stored names without a rule: {list(unmatched)}")
    if unknown:
        problems.append(f"paths the encoder does not have: {unknown}")
    if missing:
        problems.append(f"encoder parameters not provided: {missing}")
    if shapes:
        problems.append(f"shape mismatches: {shapes}")
    return problems


def _dotted(path: tuple) -> str:
    return ".".join(str(key) for key in path)
