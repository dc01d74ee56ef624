"""Where images sit in a prompt: the token layout and its soft-token slots.

A prompt carries one *image marker* (`<start_of_image>`, id 255999) per
image. `expand_images` replaces each marker by the Gemma 3 image block

    "\\n\\n", <start_of_image>, M soft positions, <end_of_image>, "\\n\\n"

as HF's `Gemma3Processor` does in text. *Soft positions* hold a placeholder
id; their embeddings are replaced by the image's *soft tokens* (projected
vision features, see `gemma_lab.vision.projector`). Each image's soft
positions form one *group* (1 for the first image, 2 for the second, ...;
0 for text): tokens of one group attend to each other in both directions,
everything else is causal (see `gemma_lab.attention.attention_mask`).

`batch_layouts` pads layouts into [B, T] arrays (positions -1 on padding),
and `place_soft_tokens` scatters soft tokens [I, M, D] into those slots, in
reading order: row 0's images first, then row 1's, and so on.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

IMAGE_MARKER = "<start_of_image>"
START_OF_IMAGE_ID = 255999
END_OF_IMAGE_ID = 256000
NEWLINE_NEWLINE_ID = 108
IMAGE_SOFT_TOKEN_ID = 262144
"""`<image_soft_token>` in the multimodal (4B+) vocabulary of 262,208 ids.

The 270M vocabulary has 262,144 ids and lacks it; pass `soft_id=0` (pad)
there. Ids at soft positions never reach the embedding table in
`gemma_lab.multimodal`, which uses 0 there, as the reference does.
"""


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """One prompt with its image blocks expanded.

    Attributes:
        ids: [T] int32 token ids, placeholders at soft positions.
        soft_mask: [T] bool, True at soft positions.
        groups: [T] int32, image number (from 1) at soft positions, else 0.
        num_images: images in the prompt.
    """

    ids: np.ndarray
    soft_mask: np.ndarray
    groups: np.ndarray
    num_images: int

    def __len__(self) -> int:
        return len(self.ids)


@dataclasses.dataclass(frozen=True)
class LayoutBatch:
    """Layouts padded on the right into arrays.

    Attributes:
        tokens: [B, T] int32, `pad_id` on padding.
        positions: [B, T] int32, 0.. along each row, -1 on padding.
        soft_mask: [B, T] bool.
        groups: [B, T] int32.
        num_images: [B] images per row; soft tokens are read in row order.
    """

    tokens: np.ndarray
    positions: np.ndarray
    soft_mask: np.ndarray
    groups: np.ndarray
    num_images: np.ndarray


def expand_images(
    ids: Sequence[int],
    *,
    tokens_per_image: int = 256,
    num_images: int | None = None,
    start_id: int = START_OF_IMAGE_ID,
    end_id: int = END_OF_IMAGE_ID,
    newline_newline_id: int = NEWLINE_NEWLINE_ID,
    soft_id: int = IMAGE_SOFT_TOKEN_ID,
) -> ImageLayout:
    """Expands every image marker of a tokenised prompt into an image block.

    Args:
        ids: token ids, e.g. `tokenizer.encode("Describe <start_of_image>.")`;
            each `start_id` is one image.
        tokens_per_image: M, soft positions per image.
        num_images: the number of images that come with the prompt; when
            given, it must equal the number of markers.
        start_id: id of `<start_of_image>` (the marker).
        end_id: id of `<end_of_image>`.
        newline_newline_id: id of "\\n\\n".
        soft_id: placeholder id at soft positions.

    Returns:
        An `ImageLayout`; a prompt without markers comes back unchanged.

    Raises:
        ValueError: on a non-positive `tokens_per_image`, or a marker count
            that differs from `num_images`.

    >>> layout = expand_images([2, 7, 255999, 9], tokens_per_image=3)
    >>> layout.ids.tolist()[:5], int(layout.soft_mask.sum()), len(layout)
    ([2, 7, 108, 255999, 262144], 3, 10)
    """
    if not isinstance(tokens_per_image, int) or tokens_per_image <= 0:
        raise ValueError(
            f"tokens_per_image={tokens_per_image!r}; expected a positive int."
        )
    markers = sum(1 for i in ids if i == start_id)
    if num_images is not None and markers != num_images:
        raise ValueError(
            f"the prompt has {markers} image markers ({start_id}, "
            f"{IMAGE_MARKER!r}) but num_images={num_images}; expected one "
            "marker per image."
        )

    out_ids, groups = [], []
    image = 0
    for token in ids:
        if token != start_id:
            out_ids.append(int(token))
            groups.append(0)
            continue
        image += 1
        out_ids += [newline_newline_id, start_id]
        out_ids += [soft_id] * tokens_per_image
        out_ids += [end_id, newline_newline_id]
        groups += [0, 0] + [image] * tokens_per_image + [0, 0]

    groups = np.asarray(groups, np.int32)
    return ImageLayout(
        ids=np.asarray(out_ids, np.int32),
        soft_mask=groups > 0,
        groups=groups,
        num_images=image,
    )


def batch_layouts(
    layouts: Sequence[ImageLayout],
    *,
    length: int | None = None,
    pad_id: int = 0,
) -> LayoutBatch:
    """Pads layouts on the right into one batch.

    Args:
        layouts: one `ImageLayout` per row.
        length: T; default the longest layout. Use a fixed bucket to keep
            jit shapes static.
        pad_id: token id on padding.

    Returns:
        A `LayoutBatch` with positions 0.. per row and -1 on padding.

    Raises:
        ValueError: on an empty list, or a layout longer than `length`.
    """
    if not layouts:
        raise ValueError("layouts is empty; expected at least one layout.")
    longest = max(len(layout) for layout in layouts)
    length = longest if length is None else length
    if longest > length:
        raise ValueError(
            f"length={length}, but a layout has {longest} tokens; expected "
            "length >= the longest layout."
        )

    b = len(layouts)
    tokens = np.full((b, length), pad_id, np.int32)
    positions = np.full((b, length), -1, np.int32)
    groups = np.zeros((b, length), np.int32)
    for row, layout in enumerate(layouts):
        t = len(layout)
        tokens[row, :t] = layout.ids
        positions[row, :t] = np.arange(t, dtype=np.int32)
        groups[row, :t] = layout.groups
    return LayoutBatch(
        tokens=tokens,
        positions=positions,
        soft_mask=groups > 0,
        groups=groups,
        num_images=np.asarray([x.num_images for x in layouts], np.int32),
    )


def place_soft_tokens(
    soft_tokens: Float[Array, "I M D"], soft_mask: Bool[Array, "B T"]
) -> Float[Array, "B T D"]:
    """Scatters soft tokens into the soft positions, in reading order.

    The k-th True of `soft_mask` (row-major) receives row k of
    `soft_tokens` flattened to [I * M, D]; other positions get zeros.

    Args:
        soft_tokens: I images' soft tokens, in the order the images appear
            (row 0's images first).
        soft_mask: the soft positions of a batch.

    Returns:
        [B, T, D] soft embeddings, for `Transformer.forward(soft_embeddings=)`.

    Raises:
        ValueError: when `soft_mask` is concrete and its count of soft
            positions differs from I * M (checked before any work).
    """
    rows = soft_tokens.shape[0] * soft_tokens.shape[1]
    if not isinstance(soft_mask, jax.core.Tracer):
        count = int(np.asarray(soft_mask).sum())
        if count != rows:
            raise ValueError(
                f"soft_mask has {count} soft positions but soft_tokens has "
                f"shape {soft_tokens.shape} ({rows} rows); expected one "
                "soft position per soft-token row (tokens_per_image must "
                "equal the projector's tokens_out)."
            )

    flat = soft_tokens.reshape(rows, soft_tokens.shape[-1])
    mask = jnp.asarray(soft_mask)
    index = jnp.cumsum(mask.reshape(-1)) - 1  # [B * T]
    gathered = jnp.take(flat, jnp.clip(index, 0, rows - 1), axis=0)
    gathered = jnp.where(mask.reshape(-1, 1), gathered, 0)
    return gathered.reshape(*mask.shape, flat.shape[-1])


def groups_from_soft_mask(soft_mask: Bool[Array, "B T"]) -> Array:
    """Numbers each run of soft positions per row: 1, 2, ...; 0 for text.

    The reference derives the same blocks from `token_type_ids`; runs are
    separated by `<end_of_image>` and `<start_of_image>` in any layout from
    `expand_images`.

    Returns:
        [B, T] int32 group ids.
    """
    mask = jnp.asarray(soft_mask, bool)
    previous = jnp.pad(mask[:, :-1], ((0, 0), (1, 0)))
    starts = (mask & ~previous).astype(jnp.int32)
    return jnp.where(mask, jnp.cumsum(starts, axis=1), 0).astype(jnp.int32)
