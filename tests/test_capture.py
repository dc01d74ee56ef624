"""The capture API: attention probabilities and residuals of chosen layers."""

import jax
import numpy as np
import pytest
from flax import nnx

from gemma_lab import testing
from gemma_lab.capture import Capture, capture, check_layers, residual_stream

W = testing.TINY_CONFIG.sliding_window  # 8
T = 24  # three windows


@pytest.fixture(scope="module")
def tiny():
    return testing.tiny_model(seed=3)


@pytest.fixture(scope="module")
def tokens():
    ids = jax.random.randint(jax.random.key(0), (2, T), 3, 512)
    return ids.at[:, 0].set(2)


@pytest.fixture(scope="module")
def tiny_capture(tiny, tokens):
    return capture(tiny, tokens)


def test_capture_keeps_every_layer_by_default_with_documented_shapes(
    tiny_capture,
):
    c = testing.TINY_CONFIG
    assert tiny_capture.layers == tuple(range(c.num_layers))
    for layer in tiny_capture.layers:
        assert tiny_capture.attention[layer].shape == (2, c.num_heads, T, T)
        assert tiny_capture.residual[layer].shape == (2, T, c.width)
    assert tiny_capture.logits.shape == (2, T, c.vocab_size)
    assert residual_stream(tiny_capture).shape == (c.num_layers, 2, T, c.width)


def test_captured_rows_sum_to_one(tiny_capture):
    for probs in tiny_capture.attention.values():
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)


def test_captured_probs_are_zero_above_the_diagonal(tiny_capture):
    future = np.triu(np.ones((T, T), bool), k=1)
    for probs in tiny_capture.attention.values():
        assert np.all(np.asarray(probs)[..., future] == 0.0)


def test_local_layers_give_zero_weight_to_keys_a_window_or_more_back(
    tiny_capture,
):
    query, key = np.indices((T, T))
    too_far = query - key >= W
    c = testing.TINY_CONFIG
    for layer, probs in tiny_capture.attention.items():
        probs = np.asarray(probs)
        if layer in c.global_layers:
            # Global layers do see far keys (random weights: never exactly 0).
            assert np.all(probs[..., too_far] > 0.0)
        else:
            assert np.all(probs[..., too_far] == 0.0)
            assert np.all(probs[..., (query - key == W - 1)] > 0.0)


def test_capturing_leaves_the_logits_unchanged(tiny, tokens):
    plain = tiny.forward(tokens).logits
    captured = capture(tiny, tokens, jit=False).logits
    np.testing.assert_allclose(captured, plain, atol=1e-6, rtol=0)

    plain_jit = nnx.jit(lambda m, t: m.forward(t).logits)(tiny, tokens)
    captured_jit = capture(tiny, tokens, jit=True).logits
    np.testing.assert_allclose(captured_jit, plain_jit, atol=1e-6, rtol=0)


def test_only_requested_layers_are_kept(tiny, tokens):
    cap = capture(tiny, tokens, layers=(-1, 1), return_logits=False)
    assert cap.layers == (1, 3)
    assert set(cap.residual) == {1, 3}
    assert cap.logits is None


def test_capture_traces_inside_a_callers_jit(tiny, tokens, tiny_capture):
    @nnx.jit
    def run(model, ids):
        return capture(model, ids, layers=(0, 2), jit=False)

    cap = run(tiny, tokens)
    assert isinstance(cap, Capture) and cap.layers == (0, 2)
    for layer in (0, 2):
        np.testing.assert_allclose(
            cap.attention[layer], tiny_capture.attention[layer], atol=1e-5
        )


def test_residual_of_the_last_layer_is_the_input_of_the_final_norm(
    tiny, tiny_capture
):
    last = tiny_capture.residual[len(tiny.layers) - 1]
    np.testing.assert_allclose(
        tiny.logits(tiny.final_norm(last)), tiny_capture.logits, atol=1e-5
    )


def test_probs_returns_one_heads_map_and_names_missing_layers(tiny, tokens):
    cap = capture(tiny, tokens, layers=(2,))
    np.testing.assert_array_equal(
        cap.probs(2, 1, row=1), cap.attention[2][1, 1]
    )
    with pytest.raises(KeyError, match="layer 0 was not captured"):
        cap.probs(0, 0)
    with pytest.raises(IndexError, match="head must be in"):
        cap.probs(2, 4)


def test_capture_rejects_bad_layers_and_token_shapes(tiny, tokens):
    with pytest.raises(ValueError, match="layers must lie in"):
        capture(tiny, tokens, layers=(4,))
    with pytest.raises(ValueError, match="at least one layer"):
        check_layers((), 4)
    with pytest.raises(ValueError, match=r"tokens must have shape \[B, T\]"):
        capture(tiny, tokens[0])


def test_real_model_local_layer_masks_keys_past_512_and_global_does_not(
    real_model,
):
    model, _ = real_model
    window = model.config.sliding_window  # 512
    t = window + 88
    ids = jax.random.randint(jax.random.key(1), (1, t), 1000, 200_000)
    ids = ids.at[:, 0].set(2)
    cap = capture(model, ids, layers=(0, 5), return_logits=False)

    query, key = np.indices((t, t))
    too_far = query - key >= window
    local, global_ = (np.asarray(cap.attention[i][0]) for i in (0, 5))
    np.testing.assert_allclose(local.sum(-1), 1.0, atol=1e-5)
    assert np.all(local[:, too_far] == 0.0)
    assert np.all(local[:, np.triu(np.ones((t, t), bool), k=1)] == 0.0)
    # The global layer keeps attending to <bos>, 599 positions back.
    assert np.all(global_[:, -1, 0] > 1e-3)


@pytest.mark.parametrize("bad", [-1, 512])
def test_capture_rejects_token_ids_outside_the_vocabulary(tiny, tokens, bad):
    ids = tokens.at[1, 5].set(bad)
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 512\)"):
        capture(tiny, ids)
