"""Tests of sampling and chat with images on a tiny random Gemma 3 model.

The tiny multimodal model keeps the Gemma 3 vocabulary (so the real
tokenizer and the real image ids apply) at a width of 64, with a 1-block
SigLIP-style encoder whose 16 patches pool to 4 soft tokens per image.
"""

import dataclasses

import numpy as np
import pytest
from flax import nnx

from gemma_lab.chat import ChatSession, render
from gemma_lab.multimodal import Gemma3Multimodal, prepare_prompt
from gemma_lab.sampler import Sampler
from gemma_lab.testing import TINY_CONFIG
from gemma_lab.vision import ViTConfig

MARKER = 255999
STEPS = 6


@pytest.fixture(scope="module")
def model():
    text = dataclasses.replace(TINY_CONFIG, vocab_size=262144)
    vision = ViTConfig(
        image_size=28, patch_size=7, width=32, depth=1, num_heads=4,
        mlp_dim=64, num_positions=16,
    )  # fmt: skip
    return Gemma3Multimodal.create(
        text, vision, tokens_per_image=4, rngs=nnx.Rngs(0)
    )


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, 30, 3), np.uint8) for h in (20, 40, 28)]


def _recomputed(model, ids, images, steps):
    """Greedy tokens and logits of a cache-free pass over a whole sequence.

    Within a prompt only the image groups attend both ways, and they lie
    before the generated tokens, so each position's logits equal those of
    recomputing its prefix alone.
    """
    prompt = prepare_prompt(model, [ids], images)
    out = model.language_model.forward(
        prompt.tokens, prompt.positions,
        soft_embeddings=prompt.soft_embeddings,
        soft_mask=prompt.soft_mask, groups=prompt.groups,
    )  # fmt: skip
    n = int((np.asarray(prompt.positions) >= 0).sum())
    logits = np.asarray(out.logits[0, n - steps - 1 : n - 1])
    return logits.argmax(-1).tolist(), logits


def test_greedy_tokens_with_images_equal_a_cache_free_recompute(model, images):
    rows = [[2, 10, MARKER, 11, 12, MARKER, 13], [2, 14, MARKER, 15]]
    sampler = Sampler(model)
    result = sampler.generate(
        rows, images=images, max_new_tokens=STEPS, stop_ids=(),
        return_logits=True,
    )  # fmt: skip

    seen_by_row = (images[:2], images[2:])
    for row, (ids, seen) in enumerate(zip(rows, seen_by_row, strict=True)):
        full = ids + result.tokens[row]
        tokens, logits = _recomputed(model, full, seen, STEPS)
        assert tokens == result.tokens[row]
        np.testing.assert_allclose(
            result.logits[row], logits, atol=1e-4, rtol=1e-4
        )
        expanded = len(ids) + ids.count(MARKER) * (4 + 4 - 1)
        assert result.lengths[row] == expanded + STEPS - 1


def test_marker_and_image_counts_must_agree(model, images):
    sampler = Sampler(model)
    with pytest.raises(ValueError, match="2 image markers .* 1 images"):
        sampler.generate(
            [2, MARKER, 5, MARKER], images=images[:1], max_new_tokens=2
        )
    with pytest.raises(ValueError, match="1 image markers .* 0 images"):
        sampler.generate([2, MARKER, 5], max_new_tokens=2)


def test_images_need_a_multimodal_model(model, images):
    with pytest.raises(ValueError, match="Gemma3Multimodal"):
        Sampler(model.language_model).generate(
            [2, MARKER], images=images[:1], max_new_tokens=2
        )


def test_chat_turns_with_images_equal_one_call_over_the_history(
    model, images, real_model
):
    _, tokenizer = real_model
    sampler = Sampler(model, tokenizer)
    session = ChatSession(
        sampler, max_len=256, max_new_tokens=STEPS, stop_ids=()
    )
    session.send("Describe this.", images=images[:1])
    second = session.send("And <start_of_image> this?", images=images[1:2])
    assert session.messages[0]["content"].startswith("<start_of_image>")

    history = session.messages[:-1]
    ids = tokenizer.encode(render(history))
    expanded = sampler.expand_prompt(ids)
    assert session.token_ids[: len(expanded)] == expanded
    alone = sampler.generate(
        ids, images=images[:2], max_new_tokens=STEPS, stop_ids=(), max_len=256
    )
    assert alone.text == second
