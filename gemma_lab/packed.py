"""Exact 8-bit copies of quantised weights, for one-token products.

A GGUF file keeps most of Gemma's weights in 4 to 8 bits: blocks of 16 or 32
small integers sharing a float scale (and, for some types, an offset).
gemma_lab computes in float32, so loading turns every weight into 4 bytes.
Decoding one token at a time reads every weight once per token, so its speed
is set by how many bytes it reads. A `PackedMatrix` keeps the integers and
their block scales next to the float32 weights, and a single-token product
reads those instead: about a quarter of the bytes, for the very same weights,

    weight = value * scale - offset      (one rounding, as in dequantising)

`attach` checks that equality bit for bit before it puts a packed copy on a
module. One-token products (batch-1 decode steps) read every packed copy;
the output head, the largest matrix, also reads its copy for up to
`FEW_ROWS` rows (batched decode steps). Longer products (prefill, training)
keep using the float32 weights, which the CPU multiplies faster in bulk.

Layout: [R, C] with R output features and blocks running along C, the input
features (the layout of the GGUF tensor). Letters follow the legend in
`gemma_lab.attention`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int8


class Packed(nnx.Variable):
    """An integer or scale array of a packed weight (never trained)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PackedMatrix:
    """Integers and per-block scale and offset of an [R, C] weight.

    Attributes:
        values: [R, C] int8.
        scale: [R, C / G] float32, one per block of G values along C.
        offset: [R, C / G] float32, subtracted after scaling; None for the
            block types without one (Q8_0, Q5_0, Q6_K).
    """

    values: Int8[Array, "R C"]
    scale: Float[Array, "R G"]
    offset: Float[Array, "R G"] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)


def check_packed(matrix: PackedMatrix, *, name: str = "matrix") -> None:
    """Raises ValueError unless the three arrays fit one another."""
    r, c = matrix.values.shape
    if matrix.values.dtype != np.int8:
        raise ValueError(
            f"{name}.values has dtype {matrix.values.dtype}, expected int8"
        )
    parts = ("scale",) if matrix.offset is None else ("scale", "offset")
    for part in parts:
        shape = tuple(getattr(matrix, part).shape)
        if len(shape) != 2 or shape[0] != r or shape[1] == 0 or c % shape[1]:
            raise ValueError(
                f"{name}.{part} has shape {shape}; expected ({r}, C / G) "
                f"with G dividing C = {c}"
            )
    if matrix.offset is not None and matrix.scale.shape != matrix.offset.shape:
        raise ValueError(
            f"{name}.scale {tuple(matrix.scale.shape)} and offset "
            f"{tuple(matrix.offset.shape)} differ in shape"
        )


def unpack(matrix: PackedMatrix) -> Float[Array, "R C"]:
    """The float32 weights: value * scale (- offset), block by block."""
    r, c = matrix.values.shape
    groups = matrix.scale.shape[1]
    blocks = matrix.values.reshape(r, groups, c // groups).astype(jnp.float32)
    out = blocks * matrix.scale[..., None]
    if matrix.offset is not None:
        out = out - matrix.offset[..., None]
    return out.reshape(r, c)


def matvec(x: Float[Array, "... C"], matrix: PackedMatrix) -> Array:
    """x @ unpack(matrix).T, for one row of x.

    Written as a 2-D matrix product over the unpacked weights: for a single
    row XLA's CPU backend fuses the unpacking into the product, so the
    float32 weights are never written out. It does not for several rows, nor
    for a product with batch axes, hence the reshape and `single_token`.
    """
    _check_width(x, matrix)
    rows = _computed_once(x.reshape(-1, x.shape[-1])) @ unpack(matrix).T
    return rows.reshape(*x.shape[:-1], rows.shape[-1])


def _check_width(x: Array, matrix: PackedMatrix) -> None:
    """Raises ValueError unless x's last axis is the matrix's C."""
    if x.ndim == 0 or x.shape[-1] != matrix.shape[1]:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; expected a last axis of "
            f"{matrix.shape[1]} for a packed {matrix.shape} matrix"
        )


def _computed_once(x: Array) -> Array:
    """x, behind a fusion boundary.

    XLA would otherwise fuse x's producer (a norm, GELU) into the product,
    where it is recomputed for every row of the matrix, which doubles the
    cost of a small product. `optimization_barrier` is removed before fusion
    on CPU; a conditional is not, and both its branches return x.
    """
    return jax.lax.cond(
        jnp.isnan(x.ravel()[0]), lambda v: v + 0, lambda v: v, x
    )


FEW_ROWS = 16
"""Products over at most this many rows read the packed copy (decoding)."""

CHUNK_ROWS = 4096
"""Weight rows unpacked per loop step of `matmul` and `argmax_matmul`.

10 MB of float32 for the 270M's head. On a 2-core Xeon (2 MB of L2 a core)
4,096 rows make a batch-8 decode step about 6 % faster than 2,048, and
about as fast as 8,192 (`python bench/bench_chunk_rows.py --chunks 2048
4096 8192`); on a 2-core AMD EPYC the head's product took the same time at
2,048 and 4,096 rows (`bench/bench_products.py`).
"""


def matmul(x: Float[Array, "... C"], matrix: PackedMatrix) -> Array:
    """x @ unpack(matrix).T for a few rows of x, a chunk of weights at a time.

    For more than one row XLA's CPU backend writes the unpacked weights out
    before the product: 671 MB for the output head. Unpacking `CHUNK_ROWS`
    weight rows per loop step (and the remaining rows after the loop) keeps
    each chunk in the cache, so the call reads the 8-bit values once from
    memory. Each chunk is multiplied as weights @ x.T, which the CPU runs
    about a third faster than x @ weights.T for a few rows
    (`bench/bench_products.py`).
    """
    _check_width(x, matrix)
    r, c = matrix.shape
    rows = x.reshape(-1, c).astype(jnp.float32)
    chunks, tail = _split_rows(matrix)
    parts = []
    if chunks is not None:
        _, out = jax.lax.scan(
            lambda _, part: (None, unpack(part) @ rows.T), None, chunks
        )  # [R / chunk, chunk, rows]
        parts.append(out.reshape(-1, rows.shape[0]))
    if tail is not None:
        parts.append(unpack(tail) @ rows.T)
    out = jnp.concatenate(parts) if len(parts) > 1 else parts[0]  # [R, rows]
    return out.T.reshape(*x.shape[:-1], r)


def _split_rows(matrix: PackedMatrix):
    """(the full `CHUNK_ROWS` chunks stacked [N, chunk, ...], the remaining
    rows); either is None when empty. A matrix of at most one chunk is all
    tail."""
    r = matrix.shape[0]
    full = r // CHUNK_ROWS * CHUNK_ROWS if r > CHUNK_ROWS else 0
    chunks = tail = None
    if full:
        chunks = jax.tree.map(
            lambda a: a[:full].reshape(-1, CHUNK_ROWS, a.shape[-1]), matrix
        )
    if full < r:
        tail = jax.tree.map(lambda a: a[full:], matrix)
    return chunks, tail


def first_max(values: Array, axis: int = -1) -> tuple[Array, Array]:
    """(largest value, its first index) along `axis`, as `jnp.argmax` picks.

    Written as a max, then the smallest index holding it: plain reductions,
    which XLA's CPU backend runs about three times faster than argmax's
    paired (value, index) reduction over 262,144 logits. A NaN counts as the
    largest value, as in `jnp.argmax`; it is looked for on its own, since
    the CPU's vectorised max skips NaN in long rows.
    """
    nan = jnp.isnan(values)
    has_nan = jnp.any(nan, axis=axis, keepdims=True)
    best = jnp.max(values, axis=axis, keepdims=True)
    best = jnp.where(has_nan, jnp.nan, best)
    hit = jnp.where(has_nan, nan, values == best)
    size = values.shape[axis]
    shape = [1] * values.ndim
    shape[axis] = size
    index = jnp.arange(size, dtype=jnp.int32).reshape(shape)
    first = jnp.min(jnp.where(hit, index, size), axis=axis)
    return jnp.squeeze(best, axis), first


def argmax_matmul(x: Float[Array, "B C"], matrix: PackedMatrix) -> Array:
    """The first index of each row's largest entry of x @ unpack(matrix).T.

    The greedy pick of a batched decode step over the 8-bit output head:
    each chunk of `matmul` is reduced to its largest entry as soon as it is
    computed, so the [B, R] products (8 MB of logits for 8 rows) are never
    written out, nor read again to find the largest. Ties and NaN resolve as
    in `first_max`, over the whole row.

    Returns:
        [B] int32 indices into R.
    """
    _check_width(x, matrix)
    x = x.astype(jnp.float32)
    chunks, tail = _split_rows(matrix)

    def pick(carry, part):
        best, index, start = carry
        part_best, part_index = first_max(unpack(part) @ x.T, axis=0)
        # A later chunk wins only with a larger value, or the first NaN.
        wins = (part_best > best) | (jnp.isnan(part_best) & ~jnp.isnan(best))
        index = jnp.where(wins, start + part_index, index)
        start = start + part.values.shape[0]
        return (jnp.where(wins, part_best, best), index, start), None

    rows = x.shape[0]
    carry = (
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.int32),
        jnp.int32(0),
    )
    if chunks is not None:
        carry, _ = jax.lax.scan(pick, carry, chunks)
    if tail is not None:
        carry, _ = pick(carry, tail)
    return carry[1]


def product(x: Float[Array, "... C"], matrix: PackedMatrix) -> Array:
    """x @ unpack(matrix).T, the fastest way for one or a few rows of x."""
    if single_token(x):
        return matvec(x, matrix)
    return matmul(x, matrix)


def single_token(x: Array) -> bool:
    """Whether x [..., C] holds one row (static under jit)."""
    return math.prod(x.shape[:-1]) == 1


def few_tokens(x: Array) -> bool:
    """Whether x [..., C] holds at most `FEW_ROWS` rows (static under jit)."""
    return math.prod(x.shape[:-1]) <= FEW_ROWS


class PackedWeight(nnx.Module):
    """Holds a `PackedMatrix` as `Packed` variables on a module."""

    def __init__(self, matrix: PackedMatrix):
        check_packed(matrix)
        self.values = Packed(jnp.asarray(matrix.values))
        self.scale = Packed(jnp.asarray(matrix.scale, jnp.float32))
        self.offset = nnx.data(
            None
            if matrix.offset is None
            else Packed(jnp.asarray(matrix.offset, jnp.float32))
        )

    def matrix(self) -> PackedMatrix:
        offset = None if self.offset is None else self.offset[...]
        return PackedMatrix(self.values[...], self.scale[...], offset)


def _weight_rows(module) -> Array:
    """The float weight of a `Linear` or `Embedder` as [R, C]."""
    if hasattr(module, "kernel"):
        return module.kernel[...].T
    return module.embedding[...]


def attach(model: nnx.Module, packed: Mapping[str, PackedMatrix]) -> None:
    """Puts packed copies on the modules they belong to, after checking them.

    Args:
        model: a `Transformer`.
        packed: {module path: PackedMatrix}, e.g. "layers.0.mlp.up_proj" (a
            `Linear`, whose kernel [C, R] is the transpose) or "embedder"
            (the [V, D] table, used by the tied output head).

    Raises:
        ValueError: a path names no such module, or the packed weights are
            not exactly the module's float32 weights.
    """
    for path, matrix in packed.items():
        module = model
        for key in path.split("."):
            module = (
                module[int(key)]
                if key.isdigit()
                else getattr(module, key, None)
            )
            if module is None:
                raise ValueError(f"packed weight {path!r}: no such module")
        if not hasattr(module, "packed"):
            raise ValueError(
                f"packed weight {path!r}: {type(module).__name__} takes no "
                f"packed copy"
            )
        check_packed(matrix, name=path)
        weight = _weight_rows(module)
        exact = weight.shape == matrix.shape and bool(
            jnp.array_equal(unpack(matrix), weight.astype(jnp.float32))
        )
        if not exact:
            raise ValueError(
                f"packed weight {path!r} {matrix.shape} does not equal the "
                f"module's weight {tuple(weight.shape)} exactly"
            )
        module.packed = nnx.data(PackedWeight(matrix))


def detach(model: nnx.Module) -> None:
    """Removes every decode copy of the weights: the packed copies and the
    `layers.KernelRows` (call after changing weights by hand)."""
    for _, module in nnx.iter_modules(model):
        for copy in ("packed", "rows"):
            if getattr(module, copy, None) is not None:
                setattr(module, copy, nnx.data(None))


def packed_paths(model: nnx.Module) -> list[str]:
    """Paths of the modules that hold a packed copy."""
    return [
        ".".join(str(k) for k in path)
        for path, module in nnx.iter_modules(model)
        if getattr(module, "packed", None) is not None
    ]
