"""Small building blocks of the Gemma 3 text model: norms, projections, MLP.

Each block is a pure function (`rms_norm`, `gelu_tanh`) plus a thin NNX module
that holds its parameters and calls it. Letters in einsums follow the legend
in `gemma_lab.attention`: B batch, T positions, D model width, F MLP width.

Decoding on a CPU reads two kinds of exact weight copies, attached by
`gemma_lab.load`: 8-bit copies for one-token products (`gemma_lab.packed`),
and `KernelRows` for products over 2 to `FEW_ROWS` tokens (batched decode
steps). A kernel's rows, [out, in], let such a product run feature-major,
rows @ x.T, which XLA's CPU backend computes in about a quarter less time
than x @ kernel for 8 tokens (`bench/bench_products.py`); the MLP stays
feature-major from its input to its output.

Numerics follow the reference Gemma implementation:
- RMSNorm is computed in float32 and its stored scale is an offset from 1,
  so a zero scale means plain normalisation;
- the MLP is GeGLU with the tanh approximation of GELU;
- the embedding is multiplied by sqrt(D) cast to the activation dtype.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from gemma_lab.packed import (
    FEW_ROWS,
    PackedWeight,
    argmax_matmul,
    few_tokens,
    first_max,
    matvec,
    product,
    single_token,
)

_DEFAULT_INIT = nnx.initializers.normal(stddev=0.02)


def rms_norm(
    x: Float[Array, "... D"], scale: Float[Array, " D"], eps: float = 1e-6
) -> Float[Array, "... D"]:
    """Root-mean-square normalisation with a scale stored as offset from 1.

    Args:
        x: activations; normalised over the last axis.
        scale: learned offset; the applied factor is `1 + scale`.
        eps: added to the mean square before the square root.

    Returns:
        Normalised `x`, in the dtype of `x`. The arithmetic is float32, as in
        the reference, whatever the input dtype.
    """
    x32 = x.astype(jnp.float32)
    inv_rms = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    out = x32 * inv_rms * (1.0 + scale.astype(jnp.float32))
    return out.astype(x.dtype)


class KernelRows(nnx.Variable):
    """A float32 [out, in] copy of a `Linear` kernel (never trained)."""


def several_tokens(x: Array) -> bool:
    """Whether x [..., D] holds 2 to `FEW_ROWS` rows (static under jit)."""
    return 1 < math.prod(x.shape[:-1]) <= FEW_ROWS


def _apart(x: Array) -> Array:
    """x, computed on its own: XLA fuses no transpose into a product then,
    which on CPU would make it several times slower."""
    return jax.lax.optimization_barrier(x)


def feature_major(x: Float[Array, "N D"]) -> Float[Array, "D N"]:
    """A few rows of activations, one column per token (see `KernelRows`)."""
    return _apart(x.T)


def rows_product(
    rows: Float[Array, "O I"], columns: Float[Array, "I N"]
) -> Float[Array, "O N"]:
    """rows @ columns: a projection of feature-major activations."""
    return _apart(rows @ columns)


def greedy_tokens(logits: Float[Array, "B V"]) -> Int[Array, " B"]:
    """The first index of each row's largest logit, as `jnp.argmax` gives
    (fast on CPU, NaN counting as largest: see `packed.first_max`)."""
    return first_max(logits, axis=-1)[1]


def gelu_tanh(x: Array) -> Array:
    """GELU with the tanh approximation: gelu_tanh(1.0) == 0.841192."""
    return jax.nn.gelu(x, approximate=True)


class RMSNorm(nnx.Module):
    """Holds the scale offset of one RMSNorm.

    Args:
        dim: size of the normalised axis.
        eps: see `rms_norm`.
        param_dtype: dtype of the stored scale.
    """

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype=jnp.float32):
        self.scale = nnx.Param(jnp.zeros((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        return rms_norm(x, self.scale[...], self.eps)


class Linear(nnx.Module):
    """A bias-free projection `y = x @ kernel` with kernel [in, out].

    Gemma's projections carry no bias. Keeping every projection in this one
    module lets LoRA wrap any of them by name (see `gemma_lab.lora`).
    `packed`, when set (see `gemma_lab.packed`), holds an exact 8-bit copy of
    the kernel that products over a single token read instead; `rows`, when
    set (`attach_rows`), the kernel's transpose that products over 2 to
    `FEW_ROWS` tokens read.

    Args:
        in_features: size of the input's last axis.
        out_features: size of the output's last axis.
        rngs: random streams for initialisation; keyword-only.
        param_dtype: dtype of the stored kernel.
        dtype: compute dtype; inputs and kernel are cast to it.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ):
        self.kernel = nnx.Param(
            _DEFAULT_INIT(
                rngs.params(), (in_features, out_features), param_dtype
            )
        )
        self.dtype = dtype
        self.packed: PackedWeight | None = nnx.data(None)
        self.rows: KernelRows | None = nnx.data(None)

    def __call__(self, x: Float[Array, "... I"]) -> Float[Array, "... O"]:
        if self.packed is not None and single_token(x):
            return matvec(x.astype(jnp.float32), self.packed.matrix()).astype(
                self.dtype
            )
        if self.rows is not None and several_tokens(x):
            _check_width(x, self.rows.shape[1])
            columns = feature_major(x.reshape(-1, x.shape[-1]))
            y = rows_product(self.rows[...], columns.astype(jnp.float32)).T
            return y.reshape(*x.shape[:-1], -1).astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        return jnp.einsum("...I,IO->...O", x.astype(self.dtype), kernel)


class Embedder(nnx.Module):
    """The token embedding table, shared with the output head (tied).

    `packed`, when set, holds an exact 8-bit copy of the table that the head
    reads for a few tokens (see `gemma_lab.packed`).

    Args:
        vocab_size: V.
        width: D.
        rngs: random streams for initialisation; keyword-only.
        param_dtype: dtype of the stored table.
        dtype: activation dtype of the embeddings and logits.
    """

    def __init__(
        self,
        vocab_size: int,
        width: int,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ):
        self.embedding = nnx.Param(
            _DEFAULT_INIT(rngs.params(), (vocab_size, width), param_dtype)
        )
        self.dtype = dtype
        self.packed: PackedWeight | None = nnx.data(None)

    def encode(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        """Looks tokens up, scaled by sqrt(D) in the activation dtype."""
        table = self.embedding[...]
        x = jnp.take(table, tokens, axis=0).astype(self.dtype)
        # The reference rounds sqrt(D) to the activation dtype first.
        return x * jnp.asarray(math.sqrt(table.shape[-1]), self.dtype)

    def decode(self, x: Float[Array, "... D"]) -> Float[Array, "... V"]:
        """The tied output head: logits = x @ embedding.T."""
        if self.packed is not None and few_tokens(x):
            return product(x.astype(jnp.float32), self.packed.matrix()).astype(
                self.dtype
            )
        table = self.embedding[...].astype(self.dtype)
        return jnp.einsum("...D,VD->...V", x.astype(self.dtype), table)

    def decode_greedy(self, x: Float[Array, "B D"]) -> Int[Array, " B"]:
        """The id of each row's largest logit: `greedy_tokens(decode(x))`.

        For 2 to `FEW_ROWS` rows with a packed copy the logits are never
        written out (`packed.argmax_matmul`); one row keeps the faster
        single-row product.
        """
        if self.packed is not None and few_tokens(x) and x.shape[0] > 1:
            return argmax_matmul(x.astype(jnp.float32), self.packed.matrix())
        return greedy_tokens(self.decode(x))


class MLP(nnx.Module):
    """GeGLU feed-forward block: down(gelu_tanh(gate(x)) * up(x)).

    Args:
        width: D.
        mlp_dim: F.
        rngs: random streams for initialisation; keyword-only.
        param_dtype: dtype of the stored kernels.
        dtype: compute dtype.
    """

    def __init__(
        self,
        width: int,
        mlp_dim: int,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ):
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        self.gate_proj = Linear(width, mlp_dim, **kw)
        self.up_proj = Linear(width, mlp_dim, **kw)
        self.down_proj = Linear(mlp_dim, width, **kw)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        parts = (self.gate_proj, self.up_proj, self.down_proj)
        if several_tokens(x) and all(_has_rows(p) for p in parts):
            return self._feature_major(x)
        hidden = gelu_tanh(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(hidden)

    def _feature_major(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        """The same block over the kernels' rows for a few tokens, with one
        transpose in and one out (a [F, N] transpose costs as much as a
        product)."""
        columns = feature_major(x.reshape(-1, x.shape[-1]))
        columns = columns.astype(jnp.float32)
        gate = rows_product(self.gate_proj.rows[...], columns)
        up = rows_product(self.up_proj.rows[...], columns)
        hidden = _apart(gelu_tanh(gate) * up)
        out = rows_product(self.down_proj.rows[...], hidden).T
        return out.reshape(x.shape).astype(self.down_proj.dtype)


def _has_rows(module) -> bool:
    return isinstance(module, Linear) and module.rows is not None


def _check_width(x: Array, width: int) -> None:
    if x.shape[-1] != width:
        raise ValueError(
            f"x has shape {tuple(x.shape)}; expected a last axis of {width}"
        )


def attach_rows(model: nnx.Module) -> None:
    """Gives every float32 `Linear` of `model` its `KernelRows`.

    Costs a second copy of the projections (about 400 MB for the 270M) and
    takes an eighth to a sixth off a batch-8 decode step on CPU
    (`bench/bench_decode.py --without-rows` gives the figure without).
    Products over 1 or more than `FEW_ROWS` tokens do not read it. Call
    `packed.detach` after changing a kernel by hand: the copy would be
    stale.
    """
    for _, module in nnx.iter_modules(model):
        if isinstance(module, Linear):
            kernel = module.kernel[...]
            if kernel.dtype == jnp.float32 and module.dtype == jnp.float32:
                module.rows = KernelRows(jnp.asarray(kernel.T))
