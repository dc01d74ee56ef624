"""LoRA fine-tuning: masked next-token loss, AdamW, checkpoints, resume.

Vocabulary:
- `Batch`: token ids [B, T], positions [B, T] (-1 for padding), labels
  [B, T] (the next id at every position) and a loss mask [B, T] that is True
  only where the label is a response token, so the prompt is never learned.
- loss positions: the P = `max_targets` positions per row where the mask is
  set. The model stops before its head (`return_logits=False`); the hidden
  states are gathered at the loss positions and only they go through the
  tied 262,144-row head, which would otherwise dominate the cost.
- micro-batches: a step takes [A, B, T] arrays and sums gradients over the A
  micro-batches before one optimizer update (gradient accumulation). The
  loss is the mean over all response tokens of the step, as if the A
  micro-batches were one batch.
- checkpoint: a folder `step_NNNNNN` holding the adapters (an adapter file,
  see `gemma_lab.lora`), the optimizer state and the step, renamed into
  place only once complete. The data order depends only on the seed and the
  step, so training resumed from a checkpoint repeats the loss curve of an
  uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm.auto as tqdm
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from gemma_lab import lora
from gemma_lab.checks import is_int, is_real
from gemma_lab.model import Transformer


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of sequences; every field is [B, T] (or [A, B, T]).

    Attributes:
        tokens: int32 input ids.
        positions: int32 positions, -1 for padding.
        labels: int32 next id at every position.
        loss_mask: bool, True where `labels` is a response token.
    """

    tokens: Array
    positions: Array
    labels: Array
    loss_mask: Array


def make_batch(
    sequences: list[tuple[list[int], int]], *, seq_len: int, pad_id: int = 0
) -> Batch:
    """Right-pads (ids, prompt length) pairs into a `Batch` of numpy arrays.

    The label at position t is ids[t + 1]; it counts in the loss when it is
    a response id, i.e. t + 1 >= prompt length.
    """
    rows = len(sequences)
    tokens = np.full((rows, seq_len), pad_id, np.int32)
    positions = np.full((rows, seq_len), -1, np.int32)
    labels = np.full((rows, seq_len), pad_id, np.int32)
    mask = np.zeros((rows, seq_len), bool)
    for row, (ids, prompt_len) in enumerate(sequences):
        if len(ids) > seq_len or not 0 < prompt_len < len(ids):
            raise ValueError(
                f"sequence {row} has {len(ids)} ids and prompt length "
                f"{prompt_len}; expected 0 < prompt < ids <= {seq_len}"
            )
        n = len(ids)
        tokens[row, :n] = ids
        positions[row, :n] = np.arange(n)
        labels[row, : n - 1] = ids[1:]
        mask[row, prompt_len - 1 : n - 1] = True
    return Batch(tokens, positions, labels, mask)


def check_sequences(
    sequences: list[tuple[list[int], int]],
    vocab_size: int,
    *,
    max_targets: int | None = None,
    seq_len: int | None = None,
    name: str = "sequences",
) -> None:
    """Raises if encoded sequences cannot be trained on as given.

    Run before training, so that no sequence fails mid-run: an id past the
    embedding table would otherwise be clamped or read as garbage inside the
    compiled step and show up only as a NaN loss, response ids past
    `max_targets` would silently drop out of the loss, and a malformed pair
    or one longer than `seq_len` would stop `make_batch` at the first step
    that draws it. `data.encode` never produces more than `seq_len` ids, so
    longer sequences are an error, not truncated.

    Args:
        sequences: a non-empty list (or other sequence) of (ids, prompt
            length) pairs, e.g. from `data.encode`.
        vocab_size: V of the model that will be trained.
        max_targets: P, the loss positions per row; None skips the check.
        seq_len: T, the most ids per sequence; None skips the check.
        name: how the error message calls `sequences`.

    Raises:
        TypeError: `sequences` is not a sequence (e.g. an iterator).
        ValueError: `sequences` is empty, or naming the first bad sequence
            and what is wrong with it: not an (ids, prompt length) pair, ids
            that are not ints, an id outside [0, vocab_size), a prompt
            length outside [1, len(ids)), more than `seq_len` ids or a
            response longer than `max_targets`.
    """
    if not isinstance(sequences, Sequence) or isinstance(
        sequences, (str, bytes)
    ):
        raise TypeError(
            f"{name} must be a list of (ids, prompt length) pairs, got "
            f"{type(sequences).__name__}"
        )
    if not sequences:
        raise ValueError(f"{name} must not be empty")
    for index, item in enumerate(sequences):
        where = f"{name}[{index}]"
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(
                f"{where} is {_short(item)}; expected an (ids, prompt "
                "length) pair"
            )
        ids, prompt_len = item
        if not isinstance(ids, (Sequence, np.ndarray)) or isinstance(
            ids, (str, bytes)
        ):
            raise ValueError(
                f"{where} has ids {_short(ids)}; expected a list of ints as "
                "the first item of (ids, prompt length)"
            )
        for token in ids:
            if not is_int(token):
                raise ValueError(
                    f"{where} holds id {token!r} ({type(token).__name__}); "
                    "expected ints"
                )
            if not 0 <= token < vocab_size:
                raise ValueError(
                    f"{where} holds token id {token}, outside the "
                    f"model's vocabulary [0, {vocab_size})"
                )
        if not is_int(prompt_len):
            raise ValueError(
                f"{where} has prompt length {prompt_len!r} "
                f"({type(prompt_len).__name__}); expected an int"
            )
        if not 1 <= prompt_len < len(ids):
            raise ValueError(
                f"{where} has prompt length {prompt_len} for {len(ids)} ids; "
                f"expected 1 <= prompt length < {len(ids)}"
            )
        if seq_len is not None and len(ids) > seq_len:
            raise ValueError(
                f"{where} has {len(ids)} ids, more than "
                f"TrainConfig.seq_len={seq_len}; raise seq_len or encode "
                "with it (data.encode)"
            )
        response_len = len(ids) - prompt_len
        if max_targets is not None and response_len > max_targets:
            raise ValueError(
                f"{where} has a response of {response_len} ids, more "
                f"than TrainConfig.max_targets={max_targets}; raise "
                f"max_targets to at least the longest response"
            )


def _short(value) -> str:
    """repr of `value`, cut to 60 characters for error messages."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def loss_positions(
    loss_mask: Bool[Array, "B T"], max_targets: int
) -> tuple[Int[Array, "B P"], Float[Array, "B P"]]:
    """Indices of the first `max_targets` masked positions, and weights.

    Rows with fewer masked positions are filled with weight-0 indices; masked
    positions beyond `max_targets` are dropped (choose it large enough).
    """
    order = jnp.argsort(~loss_mask, axis=1, stable=True)[:, :max_targets]
    weights = jnp.take_along_axis(loss_mask, order, axis=1)
    return order, weights.astype(jnp.float32)


def token_nll(
    logits: Float[Array, "B P V"], targets: Int[Array, "B P"]
) -> Float[Array, "B P"]:
    """Negative log-likelihood of each target id, in float32."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, targets[..., None], axis=-1)
    return -picked[..., 0]


def response_loss_sums(
    model: Transformer, batch: Batch, *, max_targets: int
) -> tuple[Array, Array]:
    """(sum of response-token NLL, number of response tokens) of a batch.

    Logits are computed only at the loss positions: hidden [B, T, D] ->
    gathered [B, P, D] -> logits [B, P, V].
    """
    out = model.forward(batch.tokens, batch.positions, return_logits=False)
    index, weights = loss_positions(batch.loss_mask, max_targets)
    hidden = jnp.take_along_axis(out.hidden, index[..., None], axis=1)
    targets = jnp.take_along_axis(batch.labels, index, axis=1)
    nll = token_nll(model.logits(hidden), targets)
    return jnp.sum(nll * weights), jnp.sum(weights)


def response_loss(model: Transformer, batch: Batch, *, max_targets: int):
    """Mean NLL over the response tokens of `batch` (a scalar)."""
    total, count = response_loss_sums(model, batch, max_targets=max_targets)
    return total / jnp.maximum(count, 1.0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of a LoRA fine-tuning run.

    Attributes:
        steps: optimizer updates.
        batch_size: sequences per micro-batch (B).
        grad_accum: micro-batches per update (A); an update sees A * B rows.
        seq_len: T, ids per sequence (padded).
        max_targets: P, loss positions per row: at least the longest
            response, in ids (`train` rejects longer ones).
        learning_rate: peak AdamW learning rate.
        warmup_steps: linear warmup from 0 to the peak; None (the default)
            means min(10, steps // 10), resolved when the config is made.
        end_lr_fraction: cosine decay ends at this fraction of the peak.
        weight_decay: AdamW decoupled weight decay on the adapters.
        eval_every: steps between evaluations (0: never).
        checkpoint_every: steps between checkpoints (0: never).
        keep_checkpoints: how many recent checkpoints stay on disk.
        seed: data order, in [0, 2**32).

    Counts given as numpy integers are stored as Python ints.

    Raises:
        TypeError: a count is not an int (bools are refused) or a rate is
            not a number.
        ValueError: a setting is out of range: counts must be positive
            (`eval_every`, `checkpoint_every`, `seed` may be 0), the learning
            rate finite and > 0, `end_lr_fraction` in [0, 1],
            `warmup_steps` in [0, steps), `max_targets` <= `seq_len` and
            `seed` < 2**32.
    """

    steps: int = 120
    batch_size: int = 8
    grad_accum: int = 1
    seq_len: int = 64
    max_targets: int = 8
    learning_rate: float = 1e-3
    warmup_steps: int | None = None
    end_lr_fraction: float = 0.1
    weight_decay: float = 0.01
    eval_every: int = 50
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0

    def __post_init__(self):
        for name in _COUNTS:
            _check_int(name, getattr(self, name))
            # np.int64 and friends become Python ints (hashing, JSON).
            object.__setattr__(self, name, int(getattr(self, name)))
        if self.warmup_steps is None:
            warmup = min(10, self.steps // 10)
            object.__setattr__(self, "warmup_steps", warmup)
        _check_int("warmup_steps", self.warmup_steps)
        object.__setattr__(self, "warmup_steps", int(self.warmup_steps))
        for name in ("learning_rate", "end_lr_fraction", "weight_decay"):
            _check_float(name, getattr(self, name))

        positive = ("steps", "batch_size", "grad_accum", "seq_len")
        for name in (*positive, "max_targets", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise ValueError(
                    f"TrainConfig.{name} must be > 0, got {getattr(self, name)}"
                )
        for name in ("eval_every", "checkpoint_every", "seed", "weight_decay"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(
                    f"TrainConfig.{name} must be >= 0, got {value}"
                )
        if self.learning_rate <= 0:
            raise ValueError(
                "TrainConfig.learning_rate must be > 0, got "
                f"{self.learning_rate}"
            )
        if not 0 <= self.end_lr_fraction <= 1:
            raise ValueError(
                "TrainConfig.end_lr_fraction must be in [0, 1], got "
                f"{self.end_lr_fraction}"
            )
        if self.max_targets > self.seq_len:
            raise ValueError(
                f"TrainConfig.max_targets must be <= seq_len={self.seq_len}, "
                f"got {self.max_targets}"
            )
        if self.seed >= 2**32:
            raise ValueError(
                f"TrainConfig.seed must be in [0, 2**32), got {self.seed}"
            )
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(
                f"TrainConfig.warmup_steps must be in [0, steps={self.steps})"
                f", got {self.warmup_steps}"
            )


_COUNTS = (
    "steps",
    "batch_size",
    "grad_accum",
    "seq_len",
    "max_targets",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "seed",
)


def _check_int(name: str, value) -> None:
    """Raises TypeError unless `value` is an integer (bool is not one)."""
    if not is_int(value):
        raise TypeError(
            f"TrainConfig.{name} must be an int, got {value!r} "
            f"({type(value).__name__})"
        )


def _check_float(name: str, value) -> None:
    """Raises TypeError/ValueError unless `value` is a finite real number."""
    if not is_real(value):
        raise TypeError(
            f"TrainConfig.{name} must be a number, got {value!r} "
            f"({type(value).__name__})"
        )
    if not math.isfinite(value):
        raise ValueError(f"TrainConfig.{name} must be finite, got {value}")


@functools.lru_cache(maxsize=16)
def make_optimizer(config: TrainConfig) -> optax.GradientTransformation:
    """AdamW with linear warmup and cosine decay (see `TrainConfig`).

    Cached per config, so trainers with equal settings share one compiled
    step.
    """
    warmup_cosine = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=config.steps,
        end_value=config.learning_rate * config.end_lr_fraction,
    )

    # Update k (counted from 0) uses the rate of step k + 1, so the first
    # update already moves the adapters.
    def schedule(count):
        return warmup_cosine(count + 1)

    return optax.adamw(schedule, weight_decay=config.weight_decay)


def step_indices(num: int, per_step: int, step: int, seed: int) -> np.ndarray:
    """Example indices of one step: epochs are seeded permutations.

    Depends only on its arguments, which is what makes resuming exact.
    """
    start = step * per_step
    out = []
    while len(out) < per_step:
        epoch, offset = divmod(start + len(out), num)
        order = np.random.default_rng([seed, epoch]).permutation(num)
        out.extend(order[offset : offset + per_step - len(out)].tolist())
    return np.asarray(out)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _update(graphdef, tx, max_targets, adapters, frozen, opt_state, batch):
    """One update from [A, B, T] micro-batches: (adapters, opt_state, loss)."""

    def sums(params, micro):
        model = nnx.merge(graphdef, params, frozen)
        return response_loss_sums(model, micro, max_targets=max_targets)

    grad_fn = jax.value_and_grad(sums, has_aux=True)

    def accumulate(carry, micro):
        grads, total, count = carry
        (nll, n), g = grad_fn(adapters, micro)
        grads = jax.tree.map(jnp.add, grads, g)
        return (grads, total + nll, count + n), None

    zeros = jax.tree.map(jnp.zeros_like, adapters)
    init = (zeros, jnp.zeros(()), jnp.zeros(()))
    (grads, total, count), _ = jax.lax.scan(accumulate, init, batch)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, total / count


@functools.partial(jax.jit, static_argnums=(0, 1))
def _eval_sums(graphdef, max_targets, adapters, frozen, batch):
    """(NLL sum, token count) of a [B, T] batch without an update."""
    model = nnx.merge(graphdef, adapters, frozen)
    return response_loss_sums(model, batch, max_targets=max_targets)


class Trainer:
    """Trains the adapters of a model; every other parameter stays frozen.

    The model is split once into its graph, its adapters (`LoRAParam`) and
    the frozen rest; a jit-compiled step updates only the adapters. Call
    `sync` (or `train`, which does) to write them back into the model.

    Args:
        model: a model carrying unmerged adapters (`lora.apply_lora`).
        config: the run's settings.
        mesh: optional device mesh (`gemma_lab.sharding.make_mesh`); the
            parameters are sharded FSDP-style and batches split over it.

    Raises:
        ValueError: the model has no adapters, or they are merged.
    """

    def __init__(self, model: Transformer, config: TrainConfig, *, mesh=None):
        found = lora.adapters(model)
        if not found:
            raise ValueError("model carries no adapters; call apply_lora")
        if any(m.merged for m in found.values()):
            raise ValueError("adapters are merged; call lora.unmerge first")
        if mesh is not None:
            from gemma_lab import sharding

            sharding.shard_model(model, mesh)
        self.model, self.config, self.mesh = model, config, mesh
        self.graphdef, self.adapters, self.frozen = nnx.split(
            model, lora.LoRAParam, ...
        )
        self.tx = make_optimizer(config)
        self.opt_state = self.tx.init(self.adapters)
        self.step = 0

    def _place(self, batch: Batch, axis: int) -> Batch:
        if self.mesh is None:
            return jax.tree.map(jnp.asarray, batch)
        from gemma_lab import sharding

        return sharding.shard_batch(batch, self.mesh, axis=axis)

    def train_step(self, batch: Batch) -> float:
        """One update from a [A, B, T] batch; returns its loss."""
        batch = self._place(batch, axis=1)
        self.adapters, self.opt_state, loss = _update(
            self.graphdef,
            self.tx,
            self.config.max_targets,
            self.adapters,
            self.frozen,
            self.opt_state,
            batch,
        )
        self.step += 1
        return float(loss)

    def eval_loss(self, batches: list[Batch]) -> float:
        """Mean response-token loss over [B, T] batches (no update)."""
        total, count = 0.0, 0.0
        for batch in batches:
            nll, n = _eval_sums(
                self.graphdef,
                self.config.max_targets,
                self.adapters,
                self.frozen,
                self._place(batch, axis=0),
            )
            total, count = total + float(nll), count + float(n)
        return total / max(count, 1.0)

    def sync(self) -> Transformer:
        """Writes the trained adapters back into the model and returns it."""
        nnx.update(self.model, self.adapters)
        return self.model


_CHECKPOINT_PREFIX = "step_"


def save_checkpoint(trainer: Trainer, folder: os.PathLike) -> pathlib.Path:
    """Writes adapters, optimizer state and step under `folder`, atomically.

    The checkpoint is assembled in a temporary folder and renamed to
    `folder/step_NNNNNN` when complete; older ones beyond
    `config.keep_checkpoints` are removed.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"{_CHECKPOINT_PREFIX}{trainer.step:06d}"
    tmp = pathlib.Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-"))
    try:
        lora.save_adapter(trainer.sync(), tmp / "adapter.safetensors")
        leaves = jax.device_get(jax.tree.leaves(trainer.opt_state))
        np.savez(tmp / "optimizer.npz", *[np.asarray(x) for x in leaves])
        info = {
            "step": trainer.step,
            "config": dataclasses.asdict(trainer.config),
        }
        (tmp / "trainer.json").write_text(json.dumps(info, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in checkpoints(folder)[: -trainer.config.keep_checkpoints]:
        shutil.rmtree(old)
    return final


def checkpoints(folder: os.PathLike) -> list[pathlib.Path]:
    """Complete checkpoints under `folder`, oldest first."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{_CHECKPOINT_PREFIX}*") if p.is_dir()]
    return sorted(found, key=lambda p: int(p.name[len(_CHECKPOINT_PREFIX) :]))


def restore_checkpoint(trainer: Trainer, path: os.PathLike) -> int:
    """Loads a checkpoint into `trainer` (adapters, optimizer, step).

    Returns:
        The restored step.

    Raises:
        ValueError: the optimizer state does not match the trainer's.
    """
    path = pathlib.Path(path)
    lora.load_adapter(trainer.model, path / "adapter.safetensors")
    if trainer.mesh is not None:
        from gemma_lab import sharding

        sharding.shard_model(trainer.model, trainer.mesh)
    _, trainer.adapters, _ = nnx.split(trainer.model, lora.LoRAParam, ...)
    with np.load(path / "optimizer.npz") as stored:
        leaves = [stored[f"arr_{i}"] for i in range(len(stored.files))]
    fresh, treedef = jax.tree.flatten(trainer.opt_state)
    if len(leaves) != len(fresh):
        raise ValueError(
            f"checkpoint {str(path)!r} holds {len(leaves)} optimizer arrays, "
            f"the trainer expects {len(fresh)}"
        )
    leaves = [
        jnp.asarray(v, f.dtype) for v, f in zip(leaves, fresh, strict=True)
    ]
    trainer.opt_state = jax.tree.unflatten(treedef, leaves)
    info = json.loads((path / "trainer.json").read_text())
    trainer.step = int(info["step"])
    return trainer.step


@dataclasses.dataclass
class History:
    """What a training run recorded.

    Attributes:
        steps: the step number after each update.
        losses: the training loss of each update.
        eval_steps: steps at which the held-out loss was measured.
        eval_losses: the held-out losses.
    """

    steps: list[int] = dataclasses.field(default_factory=list)
    losses: list[float] = dataclasses.field(default_factory=list)
    eval_steps: list[int] = dataclasses.field(default_factory=list)
    eval_losses: list[float] = dataclasses.field(default_factory=list)


def _step_batch(sequences, config: TrainConfig, step: int) -> Batch:
    """The [A, B, T] batch of `step`, fixed by the seed."""
    per_step = config.batch_size * config.grad_accum
    index = step_indices(len(sequences), per_step, step, config.seed)
    chosen = [sequences[i] for i in index]
    batch = make_batch(chosen, seq_len=config.seq_len)
    shape = (config.grad_accum, config.batch_size, config.seq_len)
    return jax.tree.map(lambda x: x.reshape(shape), batch)


def _eval_batches(sequences, config: TrainConfig) -> list[Batch]:
    size = config.batch_size
    chunks = [sequences[i : i + size] for i in range(0, len(sequences), size)]
    # The last chunk is padded with copies whose loss mask is cleared.
    batches = [make_batch(c, seq_len=config.seq_len) for c in chunks]
    last = batches[-1]
    missing = size - last.tokens.shape[0]
    if missing:
        pad = jax.tree.map(lambda x: np.repeat(x[:1], missing, 0), last)
        pad = dataclasses.replace(pad, loss_mask=np.zeros_like(pad.loss_mask))
        batches[-1] = jax.tree.map(
            lambda a, b: np.concatenate([a, b]), last, pad
        )
    return batches


def train(
    model: Transformer,
    sequences: list[tuple[list[int], int]],
    config: TrainConfig,
    *,
    eval_sequences: list[tuple[list[int], int]] | None = None,
    checkpoint_dir: os.PathLike | None = None,
    resume: bool = True,
    mesh=None,
    progress: bool = True,
    callback: Callable[[int, float, float | None], None] | None = None,
) -> History:
    """Trains the adapters of `model` in place.

    Args:
        model: a model carrying adapters (`lora.apply_lora`).
        sequences: (ids, prompt length) pairs, e.g. from `data.encode`.
        config: the run's settings.
        eval_sequences: held-out pairs for the periodic evaluation loss.
        checkpoint_dir: where checkpoints go; None writes none.
        resume: continue from the newest checkpoint in `checkpoint_dir`.
        mesh: optional device mesh, see `Trainer`.
        progress: show a tqdm bar with the loss.
        callback: called as callback(step, loss, eval_loss or None) after
            each update, e.g. a `gemma_lab.live_plot.LossPlot`.

    Returns:
        The `History` of the steps run by this call.

    Raises:
        TypeError: `sequences` or `eval_sequences` is not a sequence.
        ValueError: `sequences` is empty, or it or `eval_sequences` holds a
            bad pair, see `check_sequences` (checked in full before anything
            is compiled).

    >>> history = train(model, encoded, TrainConfig(steps=10))  # doctest: +SKIP
    """
    vocab_size = model.config.vocab_size
    limits = {"max_targets": config.max_targets, "seq_len": config.seq_len}
    check_sequences(sequences, vocab_size, **limits)
    if eval_sequences:
        check_sequences(
            eval_sequences, vocab_size, **limits, name="eval_sequences"
        )
    trainer = Trainer(model, config, mesh=mesh)
    found = checkpoints(checkpoint_dir) if checkpoint_dir else []
    if resume and found:
        restore_checkpoint(trainer, found[-1])
    evals = _eval_batches(eval_sequences, config) if eval_sequences else []
    history = History()
    bar = tqdm.tqdm(
        total=config.steps, initial=trainer.step, disable=not progress
    )
    with bar:
        while trainer.step < config.steps:
            loss = trainer.train_step(
                _step_batch(sequences, config, trainer.step)
            )
            step, eval_loss = trainer.step, None
            history.steps.append(step)
            history.losses.append(loss)
            if evals and config.eval_every and step % config.eval_every == 0:
                eval_loss = trainer.eval_loss(evals)
                history.eval_steps.append(step)
                history.eval_losses.append(eval_loss)
            _save_if_due(trainer, checkpoint_dir)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if callback is not None:
                callback(step, loss, eval_loss)
    trainer.sync()
    return history


def _save_if_due(trainer: Trainer, checkpoint_dir) -> None:
    every = trainer.config.checkpoint_every
    last = trainer.step == trainer.config.steps
    if checkpoint_dir and every and (trainer.step % every == 0 or last):
        save_checkpoint(trainer, checkpoint_dir)
