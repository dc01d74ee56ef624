"""Gemma 3 with images: vision encoder, projector and language model in one.

`Gemma3Multimodal` holds three parts, each usable on its own:

- `encoder`: a `VisionEncoder` (SigLIP So400m/14 at 896 px in Gemma 3), or
  None when image features are computed elsewhere (e.g. a DINOv2 encoder
  run ahead of time);
- `projector`: a `MultimodalProjector` from vision features to *soft
  tokens* of the text width;
- `language_model`: the Gemma 3 `Transformer`.

A forward pass reads: encode the images, project them to soft tokens, place
the soft tokens at the prompt's *soft positions* in reading order (see
`gemma_lab.vision.layout`), and run the language model with each image's
soft positions as one bidirectional attention group. This follows HF's
`Gemma3ForConditionalGeneration`, whose `token_type_ids` mark the same
positions: within one image attention goes both ways, everything else is
causal, and local layers keep their window on top of both.

`prepare_prompt` returns everything a sampler's prefill needs (tokens,
positions, soft embeddings, soft mask, groups). The whole prompt, or at
least each whole image, must be in one prefill chunk: cached keys carry no
group, so an image split across chunks would lose its bidirectional part.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from gemma_lab.config import TransformerConfig
from gemma_lab.model import Cache, ModelOutput, Transformer
from gemma_lab.vision.config import ViTConfig
from gemma_lab.vision.encoder import VisionEncoder
from gemma_lab.vision.layout import (
    END_OF_IMAGE_ID,
    IMAGE_SOFT_TOKEN_ID,
    START_OF_IMAGE_ID,
    batch_layouts,
    expand_images,
    groups_from_soft_mask,
    place_soft_tokens,
)
from gemma_lab.vision.preprocess import preprocess_images
from gemma_lab.vision.projector import MultimodalProjector


@dataclasses.dataclass(frozen=True)
class ImageTokenIds:
    """Special ids of the image layout (defaults: the Gemma 3 vocabulary).

    Attributes:
        start: `<start_of_image>`, also the marker written in prompts.
        end: `<end_of_image>`.
        soft: placeholder at soft positions (`<image_soft_token>`).
    """

    start: int = START_OF_IMAGE_ID
    end: int = END_OF_IMAGE_ID
    soft: int = IMAGE_SOFT_TOKEN_ID


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MultimodalPrompt:
    """What a prefill needs for a batch of prompts with images (a pytree).

    Attributes:
        tokens: [B, T] int32 ids, 0 on padding and at soft positions.
        positions: [B, T] int32, -1 on padding.
        soft_embeddings: [B, T, D] soft tokens at soft positions, else 0.
        soft_mask: [B, T] bool, the soft positions.
        groups: [B, T] int32, image number per row (from 1), 0 for text.
    """

    tokens: Array
    positions: Array
    soft_embeddings: Array
    soft_mask: Array
    groups: Array


class Gemma3Multimodal(nnx.Module):
    """Gemma 3 that reads images: encoder (optional), projector, text model.

    Args:
        language_model: the Gemma 3 `Transformer`.
        projector: maps vision features to soft tokens; its text width must
            be the language model's.
        encoder: the image encoder, or None to pass features or soft tokens
            to `forward` instead of pixels.
        image_ids: special ids of the image layout.

    >>> from gemma_lab import testing
    >>> lm = testing.tiny_model()
    >>> projector = MultimodalProjector(8, 64, tokens_out=4, rngs=nnx.Rngs(0))
    >>> model = Gemma3Multimodal(lm, projector, image_ids=ImageTokenIds(
    ...     start=500, end=501, soft=0))
    >>> prompt = prepare_prompt(model, [[2, 500, 7]],
    ...                         features=jnp.ones((1, 16, 8)))
    >>> model.language_model.forward(prompt.tokens, prompt.positions,
    ...     soft_embeddings=prompt.soft_embeddings,
    ...     soft_mask=prompt.soft_mask, groups=prompt.groups).logits.shape
    (1, 10, 512)
    """

    def __init__(
        self,
        language_model: Transformer,
        projector: MultimodalProjector,
        encoder: VisionEncoder | None = None,
        *,
        image_ids: ImageTokenIds = ImageTokenIds(),
    ):
        width = language_model.config.width
        if projector.projection.kernel.shape[1] != width:
            raise ValueError(
                f"projector projects to width "
                f"{projector.projection.kernel.shape[1]}; expected the "
                f"language model's width {width}."
            )
        if (
            encoder is not None
            and encoder.config.width != (projector.norm.scale.shape[0])
        ):
            raise ValueError(
                f"encoder width {encoder.config.width} differs from the "
                f"projector's vision width {projector.norm.scale.shape[0]}."
            )
        self.language_model = language_model
        self.projector = projector
        self.encoder = encoder
        self.image_ids = image_ids

    @classmethod
    def create(
        cls,
        text_config: TransformerConfig,
        vision_config: ViTConfig,
        *,
        tokens_per_image: int = 256,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
        dtype=jnp.float32,
    ) -> Gemma3Multimodal:
        """A randomly initialised model with a SigLIP-style encoder."""
        kw = dict(rngs=rngs, param_dtype=param_dtype, dtype=dtype)
        return cls(
            Transformer(text_config, **kw),
            MultimodalProjector(
                vision_config.width,
                text_config.width,
                tokens_out=tokens_per_image,
                eps=vision_config.layer_norm_eps,
                **kw,
            ),
            VisionEncoder(vision_config, **kw),
        )

    @property
    def tokens_per_image(self) -> int:
        """M, soft tokens per image."""
        return self.projector.tokens_out

    def encode_images(
        self, pixels: Float[Array, "I Y X 3"]
    ) -> Float[Array, "I P E"]:
        """Patch features of preprocessed images (any class token dropped).

        Raises:
            ValueError: if the model has no encoder.
        """
        if self.encoder is None:
            raise ValueError(
                "images= needs an encoder, but encoder is None; pass "
                "features= (vision features) or soft_tokens= instead."
            )
        features = self.encoder(pixels)
        if self.encoder.config.use_class_token:
            features = features[:, 1:]
        return features

    def soft_tokens(
        self,
        *,
        images: Float[Array, "I Y X 3"] | None = None,
        features: Float[Array, "I P E"] | None = None,
    ) -> Float[Array, "I M D"]:
        """Soft tokens from pixels (through the encoder) or from features."""
        if (images is None) == (features is None):
            raise ValueError("pass exactly one of images= and features=.")
        if images is not None:
            features = self.encode_images(jnp.asarray(images))
        return self.projector(jnp.asarray(features))

    def forward(
        self,
        tokens: Int[Array, "B T"],
        positions: Int[Array, "B T"] | None = None,
        *,
        images: Float[Array, "I Y X 3"] | None = None,
        features: Float[Array, "I P E"] | None = None,
        soft_tokens: Float[Array, "I M D"] | None = None,
        soft_mask: Bool[Array, "B T"] | None = None,
        groups: Int[Array, "B T"] | None = None,
        cache: Cache | None = None,
        capture_layers: tuple[int, ...] = (),
        head_mask: Float[Array, "L N"] | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Runs the language model over a prompt with images.

        Args:
            tokens: ids from `batch_layouts` (soft positions hold any id).
            positions: absolute positions, -1 on padding; default 0..T-1.
            images: I preprocessed images ([-1, 1] for SigLIP), in reading
                order; needs the encoder.
            features: instead of `images`, vision features [I, P, E].
            soft_tokens: instead of both, projected soft tokens [I, M, D].
            soft_mask: the soft positions; I * M of them. Required with
                images, features or soft tokens.
            groups: image number per soft position; default derived from
                `soft_mask` (each run of soft positions is one image).
            cache, capture_layers, head_mask, return_logits: as in
                `Transformer.forward`.

        Returns:
            The language model's `ModelOutput`.

        Raises:
            ValueError: on more than one image input, a missing
                `soft_mask`, or soft positions that do not match the soft
                tokens (checked before the encoder runs when the count of
                images is known).
        """
        given = [x is not None for x in (images, features, soft_tokens)]
        if sum(given) > 1:
            raise ValueError(
                "pass at most one of images=, features=, soft_tokens=."
            )
        if not any(given):
            return self.language_model.forward(
                tokens,
                positions,
                cache=cache,
                capture_layers=capture_layers,
                head_mask=head_mask,
                return_logits=return_logits,
            )
        if soft_mask is None:
            raise ValueError("images need soft_mask (see batch_layouts).")

        count = (images, features, soft_tokens)[given.index(True)].shape[0]
        _check_soft_count(soft_mask, count, self.tokens_per_image)
        if soft_tokens is None:
            soft_tokens = self.soft_tokens(images=images, features=features)
        soft_embeddings = place_soft_tokens(soft_tokens, soft_mask)
        if groups is None:
            groups = groups_from_soft_mask(soft_mask)

        # Soft positions may hold an id outside the vocabulary (the 262144
        # placeholder with the 270M); the reference embeds id 0 there.
        tokens = jnp.where(soft_mask, 0, tokens)
        return self.language_model.forward(
            tokens,
            positions,
            cache=cache,
            soft_embeddings=soft_embeddings,
            soft_mask=soft_mask,
            groups=groups,
            capture_layers=capture_layers,
            head_mask=head_mask,
            return_logits=return_logits,
        )

    def __call__(self, tokens, positions=None, **images) -> Array:
        """Logits; keywords as in `forward`."""
        return self.forward(tokens, positions, **images).logits


def _check_soft_count(soft_mask, images: int, per_image: int) -> None:
    """Raises unless a concrete `soft_mask` has images * per_image Trues."""
    if isinstance(soft_mask, jax.core.Tracer):
        return  # Under jit the count is unknown; shapes still must fit.
    count = int(np.asarray(soft_mask).sum())
    if count != images * per_image:
        raise ValueError(
            f"soft_mask has {count} soft positions, but {images} images of "
            f"{per_image} soft tokens give {images * per_image}; expected "
            "one image marker per image and tokens_per_image equal to the "
            "projector's tokens_out."
        )


def prepare_prompt(
    model: Gemma3Multimodal,
    prompts: Sequence[Sequence[int] | str],
    images: Sequence | None = None,
    *,
    features: Float[Array, "I P E"] | None = None,
    tokenizer=None,
    length: int | None = None,
) -> MultimodalPrompt:
    """Lays out prompts with image markers and computes their soft tokens.

    Args:
        model: the multimodal model.
        prompts: token ids or strings (with `tokenizer`), each with one
            image marker (`<start_of_image>`) per image.
        images: raw images (PIL or numpy, any size) in reading order over
            all prompts; preprocessed to the encoder's image size.
        features: instead of `images`, vision features [I, P, E].
        tokenizer: needed when `prompts` holds strings.
        length: pad every row to this T (a jit bucket); default the longest.

    Returns:
        A `MultimodalPrompt` for `Transformer.forward` (prefill).

    Raises:
        ValueError: when the number of markers differs from the number of
            images, or on both `images` and `features`.
    """
    if images is not None and features is not None:
        raise ValueError("pass images= or features=, not both.")
    ids = [_prompt_ids(p, tokenizer) for p in prompts]
    markers = sum(list(row).count(model.image_ids.start) for row in ids)
    given = 0
    if images is not None:
        given = len(images)
    elif features is not None:
        given = features.shape[0]
    if markers != given:
        raise ValueError(
            f"prompts hold {markers} image markers ({model.image_ids.start}) "
            f"but {given} images were given; expected one marker per image."
        )

    vocab = model.language_model.config.vocab_size
    soft_id = model.image_ids.soft if model.image_ids.soft < vocab else 0
    layouts = [
        expand_images(
            row,
            tokens_per_image=model.tokens_per_image,
            start_id=model.image_ids.start,
            end_id=model.image_ids.end,
            soft_id=soft_id,
        )
        for row in ids
    ]
    batch = batch_layouts(layouts, length=length)
    return _with_soft_tokens(model, batch, images, features)


def _prompt_ids(prompt, tokenizer) -> list[int]:
    if not isinstance(prompt, str):
        return [int(i) for i in prompt]
    if tokenizer is None:
        raise ValueError("prompts holds strings; pass tokenizer= as well.")
    return tokenizer.encode(prompt)


def _with_soft_tokens(model, batch, images, features) -> MultimodalPrompt:
    b, t = batch.tokens.shape
    width = model.language_model.config.width
    soft_embeddings = jnp.zeros((b, t, width), model.language_model.dtype)
    if images is not None and len(images):
        if model.encoder is None:
            raise ValueError(
                "images= needs an encoder, but model.encoder is None; pass "
                "features= instead."
            )
        size = model.encoder.config.image_size
        pixels = preprocess_images(list(images), size=size)
        soft = model.soft_tokens(images=pixels)
        soft_embeddings = place_soft_tokens(soft, batch.soft_mask)
    elif features is not None and features.shape[0]:
        soft = model.soft_tokens(features=features)
        soft_embeddings = place_soft_tokens(soft, batch.soft_mask)
    return MultimodalPrompt(
        tokens=jnp.asarray(np.where(batch.soft_mask, 0, batch.tokens)),
        positions=jnp.asarray(batch.positions),
        soft_embeddings=soft_embeddings,
        soft_mask=jnp.asarray(batch.soft_mask),
        groups=jnp.asarray(batch.groups),
    )
