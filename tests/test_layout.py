"""The image token layout: expanding markers, batching, placing soft tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_lab.vision.layout import (
    END_OF_IMAGE_ID,
    IMAGE_MARKER,
    IMAGE_SOFT_TOKEN_ID,
    NEWLINE_NEWLINE_ID,
    START_OF_IMAGE_ID,
    batch_layouts,
    expand_images,
    groups_from_soft_mask,
    place_soft_tokens,
)


def test_one_marker_becomes_the_gemma3_image_block(real_model):
    _, tokenizer = real_model
    ids = tokenizer.encode(f"Describe {IMAGE_MARKER} briefly.")
    layout = expand_images(ids, num_images=1)

    out = layout.ids.tolist()
    assert out.count(START_OF_IMAGE_ID) == 1
    assert out.count(END_OF_IMAGE_ID) == 1
    start, end = out.index(START_OF_IMAGE_ID), out.index(END_OF_IMAGE_ID)
    assert end - start - 1 == 256
    assert out[start + 1 : end] == [IMAGE_SOFT_TOKEN_ID] * 256
    assert layout.soft_mask.tolist() == [
        start < i < end for i in range(len(out))
    ]
    assert tokenizer.piece_to_id("\n\n") == NEWLINE_NEWLINE_ID
    assert out[start - 1] == out[end + 1] == NEWLINE_NEWLINE_ID
    assert tokenizer.decode(out[:start]).endswith("Describe \n\n")
    assert tokenizer.decode(out[end + 1 :]) == "\n\n briefly."


def test_layout_matches_tokenising_the_expanded_text(real_model):
    # HF's processor expands the marker in text, then tokenises.
    _, tokenizer = real_model
    text = f"A {IMAGE_MARKER} and {IMAGE_MARKER}?"
    layout = expand_images(tokenizer.encode(text), tokens_per_image=3)
    block = "\n\n<start_of_image><pad><pad><pad><end_of_image>\n\n"
    expected = tokenizer.encode(text.replace(IMAGE_MARKER, block))
    expected = [IMAGE_SOFT_TOKEN_ID if i == 0 else i for i in expected]
    assert layout.ids.tolist() == expected


def test_groups_number_the_images_from_one():
    layout = expand_images([2, 255999, 5, 255999, 6], tokens_per_image=2)
    assert layout.num_images == 2
    assert layout.groups.tolist() == [
        *[0, 0, 0, 1, 1, 0, 0],
        0,
        *[0, 0, 2, 2, 0, 0],
        0,
    ]
    assert (layout.groups > 0).tolist() == layout.soft_mask.tolist()


def test_prompt_without_markers_is_unchanged():
    layout = expand_images([2, 10, 11])
    assert layout.ids.tolist() == [2, 10, 11]
    assert layout.num_images == 0 and not layout.soft_mask.any()


def test_marker_count_must_match_the_images():
    with pytest.raises(ValueError, match="2 image markers.*num_images=1"):
        expand_images([2, 255999, 255999], num_images=1)


def test_soft_id_and_separator_ids_are_settable():
    layout = expand_images(
        [1, 9],
        tokens_per_image=2,
        start_id=9,
        end_id=8,
        newline_newline_id=7,
        soft_id=0,
    )
    assert layout.ids.tolist() == [1, 7, 9, 0, 0, 8, 7]


def test_batch_pads_on_the_right_with_position_minus_one():
    short = expand_images([2, 5])
    long = expand_images([2, 255999, 5], tokens_per_image=2)
    batch = batch_layouts([short, long], length=9, pad_id=0)

    assert batch.tokens.shape == (2, 9)
    assert batch.positions[0].tolist() == [0, 1] + [-1] * 7
    assert batch.positions[1].tolist() == list(range(8)) + [-1]
    assert batch.tokens[0, 2:].tolist() == [0] * 7
    assert batch.groups[1].tolist() == [0, 0, 0, 1, 1, 0, 0, 0, 0]
    assert batch.num_images.tolist() == [0, 1]
    with pytest.raises(ValueError, match="length=3"):
        batch_layouts([long], length=3)


def test_soft_tokens_fill_soft_positions_in_reading_order():
    layouts = [
        expand_images([2, 255999, 255999], tokens_per_image=2),
        expand_images([2, 255999, 4], tokens_per_image=2),
    ]
    batch = batch_layouts(layouts)
    soft = jnp.arange(3 * 2 * 4, dtype=jnp.float32).reshape(3, 2, 4)

    placed = np.asarray(place_soft_tokens(soft, batch.soft_mask))
    rows, cols = np.nonzero(batch.soft_mask)
    np.testing.assert_array_equal(placed[rows, cols], soft.reshape(6, 4))
    assert not placed[~batch.soft_mask].any()


def test_soft_token_count_must_match_soft_positions():
    batch = batch_layouts([expand_images([2, 255999], tokens_per_image=4)])
    with pytest.raises(ValueError, match="4 soft positions.*9 rows"):
        place_soft_tokens(jnp.zeros((1, 9, 3)), batch.soft_mask)


def test_place_soft_tokens_works_under_jit():
    batch = batch_layouts([expand_images([2, 255999], tokens_per_image=2)])
    soft = jnp.ones((1, 2, 3))
    placed = jax.jit(place_soft_tokens)(soft, batch.soft_mask)
    np.testing.assert_array_equal(placed.sum(-1)[0], 3.0 * batch.soft_mask[0])


def test_groups_from_soft_mask_number_each_run_of_soft_positions():
    layouts = [
        expand_images([2, 255999, 255999, 3], tokens_per_image=2),
        expand_images([2, 3, 255999], tokens_per_image=2),
    ]
    batch = batch_layouts(layouts)
    groups = groups_from_soft_mask(batch.soft_mask)
    np.testing.assert_array_equal(groups, batch.groups)
