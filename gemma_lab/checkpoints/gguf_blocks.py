"""Exact 8-bit forms of GGUF's quantised tensors (see `gemma_lab.packed`).

Every block type used by Gemma GGUF files stores, per block, a float16 scale
`d` (and for Q4_K a float16 `dmin`) and small integers from which `gguf`
dequantises

    w = (d * sc) * q - dmin * m

with per-group integers sc and m (sc = 1 and m = 0 for Q8_0 and Q5_0). The
bit layouts are left to `gguf`: dequantising a copy of the blocks with d = 1
and dmin = 0 gives the integers sc * q, and with d = 0 and dmin = 1 gives -m.
Dividing sc * q by the greatest common divisor of its group leaves integers
that fit in int8, and the block's weights are exactly
`value * (d * divisor) - dmin * m`.
"""

from __future__ import annotations

import gguf
import numpy as np

from gemma_lab.packed import PackedMatrix

_Q = gguf.GGMLQuantizationType

# Block type -> (byte offset of d, byte offset of dmin or None, group size).
_LAYOUT = {
    _Q.Q8_0: (0, None, 32),
    _Q.Q5_0: (0, None, 32),
    _Q.Q4_K: (0, 2, 32),
    _Q.Q6_K: (-2, None, 16),
}

PACKABLE = frozenset(_LAYOUT)
"""Block types `split_blocks` turns into a `PackedMatrix`."""


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The float16 field at a byte offset of each block, as float32 [n]."""
    end = offset + 2 or None
    field = np.ascontiguousarray(blocks[:, offset:end])
    return field.view(np.float16)[:, 0].astype(np.float32)


def _dequantize_with(blocks, kind, layout, d: float, dmin: float):
    """gguf's dequantisation of the blocks with d (and dmin) replaced."""
    d_at, dmin_at, _ = layout
    edited = blocks.copy()
    edited[:, d_at : d_at + 2 or None] = np.float16(d).reshape(1).view(np.uint8)
    if dmin_at is not None:
        edited[:, dmin_at : dmin_at + 2] = (
            np.float16(dmin).reshape(1).view(np.uint8)
        )
    return gguf.quants.dequantize(edited, kind)


def split_blocks(
    data: np.ndarray, kind: gguf.GGMLQuantizationType, shape: tuple[int, int]
) -> PackedMatrix:
    """The `PackedMatrix` of a quantised 2-D tensor.

    Args:
        data: the tensor's raw bytes as `gguf.GGUFReader` gives them.
        kind: its block type, one of `PACKABLE`.
        shape: (R, C) in PyTorch layout: rows are output features and the
            blocks run along C.

    Raises:
        ValueError: another block type, or bytes that do not fit the shape.
    """
    if kind not in _LAYOUT:
        raise ValueError(
            f"block type {gguf.GGMLQuantizationType(kind).name} cannot be "
            f"packed; expected one of {sorted(k.name for k in PACKABLE)}"
        )
    layout = _LAYOUT[kind]
    d_at, dmin_at, group = layout
    block, type_size = gguf.GGML_QUANT_SIZES[kind]
    rows, cols = shape
    if data.size != rows * cols // block * type_size or cols % block:
        raise ValueError(
            f"{data.size} bytes of {kind.name} do not hold a {shape} tensor"
        )
    blocks = np.asarray(data, np.uint8).reshape(-1, type_size)
    per_block = block // group

    ints = _dequantize_with(blocks, kind, layout, 1.0, 0.0)
    ints = np.rint(ints).astype(np.int32).reshape(rows, cols // group, group)
    divisor = np.gcd.reduce(np.abs(ints), axis=-1)
    divisor = np.maximum(divisor, 1)
    values = ints // divisor[..., None]
    if np.abs(values).max(initial=0) > 127:
        raise ValueError(f"{kind.name} integers do not fit in int8")

    d = np.repeat(_f16(blocks, d_at), per_block).reshape(divisor.shape)
    scale = d * divisor.astype(np.float32)
    offset = None
    if dmin_at is not None:
        minus_m = _dequantize_with(blocks, kind, layout, 0.0, 1.0)
        m = -minus_m.reshape(rows, cols // group, group)[..., 0]
        dmin = np.repeat(_f16(blocks, dmin_at), per_block)
        offset = dmin.reshape(m.shape) * m.astype(np.float32)
    return PackedMatrix(
        values=values.reshape(rows, cols).astype(np.int8),
        scale=scale.astype(np.float32),
        offset=None if offset is None else offset.astype(np.float32),
    )
