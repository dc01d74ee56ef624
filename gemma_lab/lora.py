"""Low-rank adapters (LoRA) around the model's projections.

Vocabulary:
- target: the attribute name of a projection to adapt, one of `TARGETS`
  (`q_proj`, `k_proj`, `v_proj`, `o_proj` in attention; `gate_proj`,
  `up_proj`, `down_proj` in the MLP).
- adapter: two matrices A [I, R] and B [R, O] added to a frozen base kernel
  [I, O] as `y = x @ kernel + (alpha / R) * (x @ A) @ B` (Hu et al., 2021).
  B starts at zero, so a freshly adapted model equals its base model.
- `LoRAParam`: the parameter type of A and B. Optimizers select trainable
  weights by this type (`nnx.Optimizer(model, tx, wrt=LoRAParam)` or
  `nnx.split(model, LoRAParam, ...)`); the base weights stay untouched.
- merge: fold `(alpha / R) * A @ B` into the base kernel for inference;
  unmerge subtracts it again.
- adapter file: a safetensors file holding only A and B, whose metadata
  records rank, alpha, targets and an identity of the base model (its config
  name and a hash of its embedding table), so loading onto another base fails
  clearly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float

from gemma_lab.checkpoints import cache
from gemma_lab.checks import is_int, is_positive_real
from gemma_lab.layers import Linear
from gemma_lab.model import Transformer

TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
"""Every projection LoRA can adapt, by attribute name."""

FORMAT = "gemma_lab.lora/1"


class LoRAParam(nnx.Param):
    """Parameter type of adapter matrices; optimizers select it by type."""


class AdapterMismatchError(ValueError):
    """An adapter file does not fit the model it is loaded onto."""


def lora_delta(
    a: Float[Array, "I R"], b: Float[Array, "R O"], scale: float
) -> Float[Array, "I O"]:
    """The kernel update `scale * A @ B` that an adapter stands for."""
    return scale * jnp.einsum("IR,RO->IO", a, b)


@jax.custom_vjp
def low_rank_product(
    x: Float[Array, "N I"], a: Float[Array, "I R"], b: Float[Array, "R O"]
) -> Float[Array, "N O"]:
    """(x @ A) @ B, with a hand-written backward pass.

    The backward pass is the textbook one, each gradient one 2-D product:
    with g the output gradient, dB = (x A)^T g, dA = x^T (g B^T) and
    dx = (g B^T) A^T. Written by hand, it keeps XLA's CPU backend from
    copying every [N, O] output gradient into a transposed layout, which
    autodiff's version of the same products led to: about a fifth of a
    LoRA training step of the 270M (see `bench/bench_train.py`).

    Raises:
        ValueError: x, a and b are not 2-D with matching inner sizes.
    """
    _check_low_rank(x, a, b)
    return (x @ a) @ b


def _check_low_rank(x, a, b) -> None:
    if not (x.ndim == a.ndim == b.ndim == 2) or (
        x.shape[1] != a.shape[0] or a.shape[1] != b.shape[0]
    ):
        raise ValueError(
            f"low_rank_product needs x [N, I], a [I, R], b [R, O]; got "
            f"{x.shape}, {a.shape}, {b.shape}"
        )


def _low_rank_forward(x, a, b):
    _check_low_rank(x, a, b)
    down = x @ a
    return down @ b, (x, down, a, b)


def _low_rank_backward(saved, g):
    x, down, a, b = saved
    g_down = g @ b.T
    grads = (g_down @ a.T, x.T @ g_down, down.T @ g)
    # Each gradient in its input's dtype, as autodiff gives it.
    inputs = (x, a, b)
    return tuple(d.astype(v.dtype) for d, v in zip(grads, inputs, strict=True))


low_rank_product.defvjp(_low_rank_forward, _low_rank_backward)


class LoRALinear(nnx.Module):
    """A frozen `Linear` plus a trainable low-rank update.

    Args:
        base: the projection to adapt; kept as is (its kernel stays an
            `nnx.Param`, so it is not trained).
        rank: R, the adapter's rank (> 0).
        alpha: scale numerator; the update is multiplied by alpha / R.
        rngs: random stream for A; keyword-only.

    A is drawn uniformly from +-1/sqrt(I), as in PEFT; B is zero.
    """

    def __init__(self, base: Linear, *, rank: int, alpha: float, rngs):
        in_features, out_features = base.kernel[...].shape
        dtype = base.kernel[...].dtype
        bound = 1.0 / math.sqrt(in_features)  # a Python float keeps dtype
        init = nnx.initializers.uniform(2 * bound)
        a = init(rngs.params(), (in_features, rank), dtype) - bound
        self.base = base
        self.lora_a = LoRAParam(a)
        self.lora_b = LoRAParam(jnp.zeros((rank, out_features), dtype))
        self.rank, self.alpha = rank, float(alpha)
        self.merged = False

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def __call__(self, x: Float[Array, "... I"]) -> Float[Array, "... O"]:
        y = self.base(x)
        if self.merged:
            return y
        dtype = self.base.dtype
        b = self.lora_b[...].astype(dtype)
        up = low_rank_product(
            x.reshape(-1, x.shape[-1]).astype(dtype),
            self.lora_a[...].astype(dtype),
            b,
        ).reshape(*x.shape[:-1], b.shape[-1])
        return y + jnp.asarray(self.scale, dtype) * up

    def merge(self) -> None:
        """Adds the update to the base kernel (no-op when merged)."""
        if not self.merged:
            self._shift(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        """Removes the update from the base kernel (no-op when unmerged)."""
        if self.merged:
            self._shift(-1.0)
            self.merged = False

    def _shift(self, sign: float) -> None:
        kernel = self.base.kernel[...]
        delta = lora_delta(
            self.lora_a[...].astype(jnp.float32),
            self.lora_b[...].astype(jnp.float32),
            self.scale,
        )
        new = kernel.astype(jnp.float32) + sign * delta
        self.base.kernel[...] = new.astype(kernel.dtype)
        # Exact copies of the old kernel would now be stale.
        self.base.packed = nnx.data(None)
        self.base.rows = nnx.data(None)


def _check_targets(targets) -> tuple[str, ...]:
    targets = tuple(targets)
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown or len(set(targets)) < len(targets):
        raise ValueError(
            f"targets must be a non-empty subset of {TARGETS} without "
            f"repeats, got {targets}"
        )
    return targets


def apply_lora(
    model: Transformer,
    *,
    rank: int,
    alpha: float | None = None,
    targets=TARGETS,
    rngs: nnx.Rngs | None = None,
) -> Transformer:
    """Wraps the named projections of `model` in `LoRALinear`, in place.

    Args:
        model: the model to adapt; must not carry adapters yet.
        rank: R > 0.
        alpha: scale numerator (alpha / R); default 2 * rank.
        targets: projection names from `TARGETS`.
        rngs: random streams for A; default `nnx.Rngs(0)`.

    Returns:
        `model` itself, now with adapters equal to zero updates.

    Raises:
        ValueError: bad rank, alpha or targets (unknown or repeated), or
            the model already has adapters.

    >>> from gemma_lab import testing
    >>> model = apply_lora(testing.tiny_model(), rank=4)
    >>> len(adapters(model))
    28
    """
    if not is_int(rank) or rank <= 0:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    rank = int(rank)
    targets = _check_targets(targets)
    if adapters(model):
        raise ValueError("model already carries LoRA adapters")
    alpha = 2.0 * rank if alpha is None else alpha
    if not is_positive_real(alpha):
        raise ValueError(f"alpha must be a finite number > 0, got {alpha!r}")
    alpha = float(alpha)
    rngs = rngs or nnx.Rngs(0)
    for _, module, name in _target_projections(model, targets):
        wrapped = LoRALinear(
            getattr(module, name), rank=rank, alpha=alpha, rngs=rngs
        )
        setattr(module, name, wrapped)
    return model


def _target_projections(
    model: nnx.Module, targets: tuple[str, ...]
) -> list[tuple[str, nnx.Module, str]]:
    """(dotted path, parent module, attribute) of each plain `Linear` that
    `apply_lora` would wrap, listed before any is changed."""
    found = []
    for module_path, module in nnx.iter_modules(model):
        for name in targets:
            if isinstance(getattr(module, name, None), Linear):
                path = ".".join(str(p) for p in (*module_path, name))
                found.append((path, module, name))
    return found


def adapters(model: Transformer) -> dict[str, LoRALinear]:
    """The model's `LoRALinear` modules keyed by dotted path."""
    return {
        ".".join(str(p) for p in path): module
        for path, module in nnx.iter_modules(model)
        if isinstance(module, LoRALinear)
    }


def merge(model: Transformer) -> Transformer:
    """Folds every adapter into its base kernel, in place (for inference)."""
    for module in adapters(model).values():
        module.merge()
    return model


def unmerge(model: Transformer) -> Transformer:
    """Undoes `merge`, in place; training continues from the same state."""
    for module in adapters(model).values():
        module.unmerge()
    return model


def base_identity(model: Transformer) -> str:
    """A short hash naming the base model: config name + embedding sample.

    The embedding table is never adapted or merged into, so the identity is
    the same before and after merging. Values are hashed after rounding to
    bfloat16, so float32 and bfloat16 loads of one checkpoint agree.
    """
    table = model.embedder.embedding[...]
    rows = table[:: max(1, table.shape[0] // 64)]
    sample = np.asarray(rows.astype(jnp.bfloat16).astype(jnp.float32))
    digest = hashlib.sha256(sample.tobytes()).hexdigest()[:16]
    return f"{model.config.name}:{digest}"


def adapter_settings(model: Transformer) -> dict:
    """rank, alpha and targets of the model's adapters (empty if none)."""
    found = adapters(model)
    if not found:
        return {}
    first = next(iter(found.values()))
    targets = sorted({path.rsplit(".", 1)[-1] for path in found})
    return {"rank": first.rank, "alpha": first.alpha, "targets": targets}


def adapter_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """{"<path>.lora_a": A, "<path>.lora_b": B} as float32 numpy arrays."""
    tensors = {}
    for path, module in adapters(model).items():
        for name in ("lora_a", "lora_b"):
            value = jax.device_get(getattr(module, name)[...])
            tensors[f"{path}.{name}"] = np.asarray(value, np.float32)
    return tensors


def save_adapter(model: Transformer, path: os.PathLike) -> pathlib.Path:
    """Saves only the adapters of `model` as safetensors, atomically.

    Args:
        model: a model carrying adapters (merged or not).
        path: destination file, e.g. "bbc_topics.safetensors".

    Returns:
        The path written.

    Raises:
        ValueError: the model carries no adapters.
    """
    from safetensors.numpy import save

    settings = adapter_settings(model)
    if not settings:
        raise ValueError("model carries no LoRA adapters; see apply_lora")
    metadata = {
        "format": FORMAT,
        "rank": str(settings["rank"]),
        "alpha": repr(settings["alpha"]),
        "targets": json.dumps(settings["targets"]),
        "base": base_identity(model),
    }
    data = save(adapter_tensors(model), metadata=metadata)
    cache.atomic_write_bytes(data, path)
    return pathlib.Path(path)


_METADATA_KEYS = ("rank", "alpha", "targets", "base")


def read_adapter(path: os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """Reads an adapter file: (metadata with typed values, tensors).

    Raises:
        FileNotFoundError: `path` does not exist.
        AdapterMismatchError: the file is not a readable safetensors file
            or not a gemma_lab adapter, its metadata lacks a key or holds a
            value that does not parse, alpha is not finite and > 0, or a
            tensor is not floating point or holds NaN or inf.
    """
    from safetensors import SafetensorError, safe_open

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise AdapterMismatchError(
            f"{str(path)!r} is not a readable safetensors adapter file "
            f"(corrupt, truncated or empty?): {error}"
        ) from error
    if raw.get("format") != FORMAT:
        raise AdapterMismatchError(
            f"{str(path)!r} is not a gemma_lab adapter file: format is "
            f"{raw.get('format')!r}, expected {FORMAT!r}"
        )
    missing = [key for key in _METADATA_KEYS if key not in raw]
    if missing:
        raise AdapterMismatchError(
            f"adapter {str(path)!r} lacks the metadata keys {missing}; "
            f"expected all of {list(_METADATA_KEYS)}, as save_adapter writes"
        )
    try:
        meta = {
            "rank": int(raw["rank"]),
            "alpha": float(raw["alpha"]),
            "targets": json.loads(raw["targets"]),
            "base": raw["base"],
        }
    except ValueError as error:
        raise AdapterMismatchError(
            f"adapter {str(path)!r} has unreadable metadata: {error}"
        ) from error
    if not is_positive_real(meta["alpha"]):
        raise AdapterMismatchError(
            f"adapter {str(path)!r} has alpha {meta['alpha']}, expected a "
            "finite number > 0"
        )
    for name, value in tensors.items():
        if not np.issubdtype(value.dtype, np.floating):
            raise AdapterMismatchError(
                f"adapter {str(path)!r}: tensor {name} has dtype "
                f"{value.dtype}, expected a floating-point dtype"
            )
        if not np.isfinite(value).all():
            raise AdapterMismatchError(
                f"adapter {str(path)!r}: tensor {name} holds non-finite "
                "values (NaN or inf)"
            )
    return meta, tensors


def _check_fit(model, meta, tensors, path) -> None:
    identity = base_identity(model)
    if meta["base"] != identity:
        raise AdapterMismatchError(
            f"adapter {str(path)!r} was trained on base {meta['base']!r}, "
            f"but the model is {identity!r}"
        )
    settings = adapter_settings(model)
    wanted = {k: meta[k] for k in ("rank", "alpha", "targets")}
    if settings and settings != wanted:
        raise AdapterMismatchError(
            f"model already carries adapters {settings}, the file holds "
            f"{wanted}"
        )


def load_adapter(model: Transformer, path: os.PathLike) -> Transformer:
    """Loads an adapter file onto `model`, in place.

    Adapters are created with the file's rank, alpha and targets when the
    model has none; existing adapters must have the same settings. A merged
    model is unmerged first and merged again afterwards. Tensors of any
    floating-point dtype (e.g. float16) are accepted and cast to the dtype
    of the model's adapter params.

    Args:
        model: a loaded base model, with or without adapters.
        path: a file written by `save_adapter`.

    Returns:
        `model`, carrying the loaded adapters.

    Raises:
        FileNotFoundError: `path` does not exist.
        AdapterMismatchError: other base model, settings, names or shapes,
            or a bad alpha or tensor (see `read_adapter`). Everything is
            checked first, so a failed load leaves `model` exactly as it
            was.
    """
    meta, tensors = read_adapter(path)
    _check_fit(model, meta, tensors, path)
    _check_tensors(_expected_shapes(model, meta, path), tensors, path)

    # Everything fits: only now is the model changed.
    if not adapters(model):
        apply_lora(
            model,
            rank=meta["rank"],
            alpha=meta["alpha"],
            targets=meta["targets"],
        )
    _assign(adapters(model), tensors)
    return model


def _expected_shapes(model, meta, path) -> dict[str, tuple[int, ...]]:
    """Adapter tensor names and shapes that `meta` would give `model`.

    Existing adapters give their own; otherwise the projections that
    `apply_lora` would wrap are found without wrapping them.
    """
    found = adapters(model)
    if found:
        return {
            f"{name}.{part}": tuple(getattr(module, part)[...].shape)
            for name, module in found.items()
            for part in ("lora_a", "lora_b")
        }
    rank = meta["rank"]
    try:
        targets = _check_targets(meta["targets"])
    except (TypeError, ValueError) as error:
        raise AdapterMismatchError(f"adapter {str(path)!r}: {error}") from error
    if rank <= 0:
        raise AdapterMismatchError(
            f"adapter {str(path)!r} has rank {rank}, expected a positive int"
        )
    shapes = {}
    for name, module, target in _target_projections(model, targets):
        in_features, out_features = getattr(module, target).kernel[...].shape
        shapes[f"{name}.lora_a"] = (in_features, rank)
        shapes[f"{name}.lora_b"] = (rank, out_features)
    return shapes


def _check_tensors(expected, tensors, path) -> None:
    """Raises AdapterMismatchError unless names and shapes match exactly."""
    missing = set(expected) - set(tensors)
    extra = set(tensors) - set(expected)
    if missing or extra:
        raise AdapterMismatchError(
            f"adapter {str(path)!r} does not fit: missing "
            f"{sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
        )
    for name, shape in expected.items():
        if tuple(tensors[name].shape) != shape:
            raise AdapterMismatchError(
                f"adapter {str(path)!r}: {name} has shape "
                f"{tensors[name].shape}, the model expects {shape}"
            )


def _assign(found: dict[str, LoRALinear], tensors) -> None:
    for name, module in found.items():
        was_merged = module.merged
        module.unmerge()
        for part in ("lora_a", "lora_b"):
            param = getattr(module, part)
            value = tensors[f"{name}.{part}"]
            param[...] = jnp.asarray(value, param[...].dtype)
        if was_merged:
            module.merge()


def parameter_counts(model: Transformer) -> tuple[int, int]:
    """(adapter parameters, all parameters) of `model`."""
    adapter = sum(x.size for x in jax.tree.leaves(nnx.state(model, LoRAParam)))
    total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    return adapter, total


def merged_model(model: Transformer) -> Transformer:
    """A plain copy of `model` with every adapter folded into its kernel.

    The copy has no `LoRALinear` left, so it has the same structure as the
    base model: functions compiled for the base (e.g. greedy decoding) are
    reused without compiling again. `model` itself is not changed.
    """
    graphdef, state = nnx.split(model)
    # Fresh variables, so that merging into the copy leaves `model` as is.
    copy = nnx.merge(graphdef, jax.tree.map(jnp.array, state))
    for _, module in list(nnx.iter_modules(copy)):
        for name in TARGETS:
            wrapper = getattr(module, name, None)
            if isinstance(wrapper, LoRALinear):
                wrapper.merge()
                setattr(module, name, wrapper.base)
    return copy
