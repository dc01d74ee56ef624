"""Gemma 3 with images: parity with transformers, masks, loading, errors.

A tiny `Gemma3ForConditionalGeneration` with random weights is saved with
`save_pretrained` and loaded by gemma_lab; its image blocks (16 soft tokens)
are longer than the local window (8), so the window and the bidirectional
image groups interact as in the real models' local layers.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import gemma_lab
from gemma_lab.attention import attention_mask
from gemma_lab.checkpoints.hf_multimodal import (
    read_multimodal,
    vision_config_from_hf,
)
from gemma_lab.checkpoints.rules import CheckpointError
from gemma_lab.multimodal import prepare_prompt
from gemma_lab.vision import SIGLIP_SO400M_896, preprocess_images
from gemma_lab.vision.layout import batch_layouts, expand_images

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

START, END, SOFT = 250, 251, 299
PROMPT = [2, 10, 11, START, 12, 13, 14, START, 15]  # text, image, text, image


def _hf_config():
    return transformers.Gemma3Config(
        text_config=dict(
            vocab_size=300,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=8,
            max_position_embeddings=256,
            layer_types=["sliding_attention", "full_attention"] * 2,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=56,
            patch_size=7,
            vision_use_head=False,
        ),
        mm_tokens_per_image=16,
        boi_token_index=START,
        eoi_token_index=END,
        image_token_index=SOFT,
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(transformers model, its saved folder, gemma_lab's loaded model)."""
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(_hf_config()).eval()
    with torch.no_grad():
        for name, param in hf.named_parameters():
            if "norm" in name or "mm_" in name:  # zeros or ones at init
                param.normal_(0.0, 0.3)
    folder = tmp_path_factory.mktemp("tiny_gemma3_mm")
    hf.save_pretrained(folder)
    return hf, folder, read_multimodal(folder)


def _layout(prompt=PROMPT):
    layout = expand_images(
        prompt, tokens_per_image=16, start_id=START, end_id=END, soft_id=SOFT
    )
    return batch_layouts([layout])


def _pixels(seed=0, count=2):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (count, 56, 56, 3)).astype(np.float32)


@nnx.jit
def _logits_and_hidden(model, tokens, positions, pixels, soft_mask, groups):
    out = model.forward(
        tokens, positions, images=pixels, soft_mask=soft_mask, groups=groups
    )
    return out.logits, out.hidden


def _ours(model, batch, pixels):
    """(logits, hidden) of one compiled forward with pixels."""
    return _logits_and_hidden(
        model,
        jnp.asarray(batch.tokens),
        jnp.asarray(batch.positions),
        jnp.asarray(pixels),
        jnp.asarray(batch.soft_mask),
        jnp.asarray(batch.groups),
    )


def test_two_images_with_text_between_match_transformers(tiny):
    hf, _, model = tiny
    batch, pixels = _layout(), _pixels()
    with torch.no_grad():
        reference = hf(
            input_ids=torch.tensor(batch.tokens, dtype=torch.long),
            pixel_values=torch.tensor(pixels).permute(0, 3, 1, 2),
            token_type_ids=torch.tensor(batch.soft_mask.astype(np.int64)),
        ).logits.numpy()

    logits = np.asarray(_ours(model, batch, pixels)[0])
    assert batch.soft_mask.sum() == 32
    np.testing.assert_allclose(logits, reference, atol=1e-4)


def test_image_pairs_attend_both_ways_and_text_stays_causal():
    batch = _layout()
    positions, groups = jnp.asarray(batch.positions), jnp.asarray(batch.groups)
    mask = np.asarray(
        attention_mask(
            positions,
            positions,
            window=None,
            query_groups=groups,
            key_groups=groups,
        )
    )[0]
    g = batch.groups[0]
    first, second = np.nonzero(g == 1)[0], np.nonzero(g == 2)[0]
    assert mask[np.ix_(first, first)].all()
    assert mask[np.ix_(second, second)].all()
    assert not mask[np.ix_(first, second)].any()
    assert mask[np.ix_(second, first)].all()
    # Outside an image's own block, attention is exactly causal.
    causal = np.tril(np.ones_like(mask))
    same = (g[:, None] == g[None, :]) & (g[:, None] > 0)
    np.testing.assert_array_equal(mask[~same], causal[~same].astype(bool))


def test_local_layers_keep_the_window_inside_an_image():
    batch = _layout()
    positions, groups = jnp.asarray(batch.positions), jnp.asarray(batch.groups)
    mask = np.asarray(
        attention_mask(
            positions,
            positions,
            window=8,
            query_groups=groups,
            key_groups=groups,
        )
    )[0]
    q, k = np.meshgrid(batch.positions[0], batch.positions[0], indexing="ij")
    g = batch.groups[0]
    same = (g[:, None] == g[None, :]) & (g[:, None] > 0)
    # The reference's rule: AND(window, OR(causal, same image)).
    expected = ((k <= q) | same) & (q - k < 8)
    np.testing.assert_array_equal(mask, expected)


def test_second_image_pixels_do_not_change_the_first_image(tiny):
    _, _, model = tiny
    batch = _layout()
    pixels = _pixels()
    changed = pixels.copy()
    changed[1] = _pixels(seed=5, count=1)[0]

    before = np.asarray(_ours(model, batch, pixels)[1][0])
    after = np.asarray(_ours(model, batch, changed)[1][0])
    second_start = int(np.nonzero(batch.groups[0] == 2)[0][0])
    np.testing.assert_array_equal(before[:second_start], after[:second_start])
    assert np.abs(before[second_start:] - after[second_start:]).max() > 1e-3


def _raw_images(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (40, 70, 3), np.uint8) for _ in range(2)]


@pytest.fixture(scope="module")
def prepared(tiny):
    """Two raw images of another size, laid out by `prepare_prompt`."""
    _, _, model = tiny
    images = _raw_images()
    return images, prepare_prompt(model, [PROMPT], images)


def test_soft_tokens_enter_the_language_model_exactly_as_projected(
    tiny, prepared
):
    _, _, model = tiny
    images, prompt = prepared
    pixels = preprocess_images(images, size=56)
    soft = np.asarray(model.soft_tokens(images=pixels))

    embedded = model.language_model.embed(
        prompt.tokens, prompt.soft_embeddings, prompt.soft_mask
    )
    rows, cols = np.nonzero(np.asarray(prompt.soft_mask))
    np.testing.assert_array_equal(
        np.asarray(embedded)[rows, cols], soft.reshape(32, -1)
    )
    text = ~np.asarray(prompt.soft_mask)
    assert not np.asarray(prompt.soft_embeddings)[text].any()


def test_prepared_prompt_gives_the_same_logits_as_forward(tiny, prepared):
    _, _, model = tiny
    images, prompt = prepared
    lm_forward = nnx.jit(
        lambda lm, p: (
            lm.forward(
                p.tokens,
                p.positions,
                soft_embeddings=p.soft_embeddings,
                soft_mask=p.soft_mask,
                groups=p.groups,
            ).logits
        )
    )
    via_prompt = lm_forward(model.language_model, prompt)

    pixels = preprocess_images(images, size=56)
    direct, _ = _ours(model, _layout(), pixels)
    np.testing.assert_allclose(via_prompt, direct, atol=1e-5)


def test_prepare_prompt_pads_a_batch_of_prompts(tiny):
    _, _, model = tiny
    features = jnp.zeros((3, 64, 32))
    prompt = prepare_prompt(model, [PROMPT, PROMPT[:4]], features=features)
    assert prompt.tokens.shape == (2, 47)
    assert prompt.positions[1].tolist() == list(range(23)) + [-1] * 24
    assert prompt.groups[0].max() == 2 and prompt.groups[1].max() == 1
    assert int(prompt.soft_mask.sum()) == 48
    # The placeholder id is outside this vocabulary only if it is >= V.
    assert set(np.asarray(prompt.tokens)[np.asarray(prompt.soft_mask)]) == {0}


def test_features_replace_pixels_when_the_encoder_is_elsewhere(tiny):
    _, _, model = tiny
    pixels = jnp.asarray(_pixels())
    features = model.encoder(pixels)
    np.testing.assert_array_equal(
        model.soft_tokens(features=features), model.soft_tokens(images=pixels)
    )
    with pytest.raises(ValueError, match="at most one"):
        model.forward(
            jnp.asarray(_layout().tokens), images=pixels, features=features
        )


def test_marker_and_image_counts_must_agree(tiny):
    _, _, model = tiny
    with pytest.raises(ValueError, match="2 image markers.*1 images"):
        prepare_prompt(model, [PROMPT], _raw_images()[:1])


def test_soft_positions_must_match_the_encoder_rows(tiny):
    _, _, model = tiny
    batch = _layout()
    with pytest.raises(ValueError, match="32 soft positions.*3 images"):
        model.forward(
            jnp.asarray(batch.tokens),
            images=jnp.asarray(_pixels(count=3)),
            soft_mask=batch.soft_mask,
        )
    wrong = batch_layouts(
        [expand_images(PROMPT, tokens_per_image=4, start_id=START)]
    )
    with pytest.raises(ValueError, match="8 soft positions.*give 32"):
        model.forward(
            jnp.asarray(wrong.tokens),
            images=jnp.asarray(_pixels()),
            soft_mask=wrong.soft_mask,
        )


def test_current_transformers_names_load_the_same_model(tiny, tmp_path):
    _, folder, model = tiny
    stored = safetensors.numpy.load_file(folder / "model.safetensors")
    renamed = {_new_name(k): v for k, v in stored.items()}
    assert "model.vision_tower.vision_model.post_layernorm.weight" in renamed
    safetensors.numpy.save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())

    other = read_multimodal(tmp_path)
    ours, theirs = nnx.state(model, nnx.Param), nnx.state(other, nnx.Param)
    for a, b in zip(
        jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    assert len(jax.tree.leaves(ours)) == len(stored)


def _new_name(name: str) -> str:
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("vision_tower.", "model.vision_tower.vision_model."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def test_text_only_load_of_a_multimodal_folder(tiny, real_model, tmp_path):
    hf, folder, _ = tiny
    for file in ("config.json", "model.safetensors"):
        (tmp_path / file).write_bytes((folder / file).read_bytes())
    tokenizer = real_model[1]
    (tmp_path / "tokenizer.model").write_bytes(tokenizer.serialized_model())

    text_model, _ = gemma_lab.load(tmp_path)
    tokens = np.array([[2, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
    with torch.no_grad():
        reference = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(
        text_model(jnp.asarray(tokens)), reference, atol=1e-4
    )


def test_missing_projector_weights_are_a_checkpoint_error(tiny, tmp_path):
    _, folder, _ = tiny
    stored = safetensors.numpy.load_file(folder / "model.safetensors")
    del stored["multi_modal_projector.mm_soft_emb_norm.weight"]
    safetensors.numpy.save_file(stored, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointError, match="missing.*norm.scale"):
        read_multimodal(tmp_path)


def test_published_gemma3_4b_vision_config_is_the_siglip_preset():
    # vision_config of google/gemma-3-4b-it's config.json.
    raw = json.loads(
        '{"vision_config": {"hidden_size": 1152, "image_size": 896, '
        '"intermediate_size": 4304, "model_type": "siglip_vision_model", '
        '"num_attention_heads": 16, "num_hidden_layers": 27, '
        '"patch_size": 14, "vision_use_head": false}}'
    )
    assert vision_config_from_hf(raw, source="4b") == SIGLIP_SO400M_896


def test_load_multimodal_names_a_missing_folder(tmp_path):
    from gemma_lab import load_multimodal

    missing = tmp_path / "gemma-3-4b-it"
    with pytest.raises(FileNotFoundError, match="folder .*does not exist"):
        load_multimodal(missing)
