"""Interpretability analyses: head scores, logit lens, head ablation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_lab import analysis, testing
from gemma_lab.capture import Capture, capture

PERIOD = 50  # the random sequence: 50 tokens, repeated twice


def random_probs(key, shape):
    """Causal rows that sum to 1, as a cache-free capture gives."""
    scores = jax.random.normal(key, shape)
    causal = np.tril(np.ones(shape[-2:], bool))
    return jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1)


def test_diagonal_score_matches_a_naive_loop():
    probs = np.asarray(random_probs(jax.random.key(0), (2, 3, 12, 12)))
    got = analysis.diagonal_score(probs, 4, start=6)
    want = np.zeros(3)
    for b in range(2):
        for t in range(6, 12):
            want += probs[b, :, t, t - 4]
    np.testing.assert_allclose(got, want / (2 * 6), rtol=1e-6)


def test_induction_score_is_one_on_a_perfect_induction_pattern():
    t = 1 + 2 * PERIOD
    probs = np.zeros((1, 2, t, t), np.float32)
    probs[:, :, np.arange(t), 0] = 1.0  # first half: park on <bos>
    queries = np.arange(PERIOD + 1, t)
    probs[:, 0, queries, 0] = 0.0
    probs[:, 0, queries, queries - PERIOD + 1] = 1.0  # head 0 only
    cap = Capture(attention={3: probs}, residual={})

    scores = analysis.induction_scores(cap, PERIOD)
    np.testing.assert_allclose(scores.values, [[1.0, 0.0]])
    assert scores.top(1) == [(3, 0)] and scores[(3, 1)] == 0.0
    np.testing.assert_allclose(
        analysis.bos_sink_scores(cap).values, [[0.5, 1.0]], atol=0.01
    )
    # Only query 1 looks at its previous token (<bos>): 1 of 100 queries.
    np.testing.assert_allclose(
        analysis.previous_token_scores(cap).values, [[0.01, 0.01]], rtol=1e-6
    )


def test_head_scores_rank_heads_and_list_those_below_a_threshold():
    values = np.array([[0.1, 0.9], [0.6, 0.05]])
    scores = analysis.HeadScores(values, (4, 7), "x")
    assert scores.top(2) == [(4, 1), (7, 0)]
    assert scores.below(0.2) == [(4, 0), (7, 1)]
    with pytest.raises(KeyError, match="layer 5 not scored"):
        scores[(5, 0)]


def test_repeated_random_tokens_are_bos_then_a_seeded_sequence_twice():
    ids = np.asarray(analysis.repeated_random_tokens(key=jax.random.key(7)))
    again = analysis.repeated_random_tokens(key=jax.random.key(7))
    assert ids.shape == (1, 1 + 2 * PERIOD) and ids[0, 0] == 2
    np.testing.assert_array_equal(ids[0, 1 : PERIOD + 1], ids[0, PERIOD + 1 :])
    np.testing.assert_array_equal(ids, again)
    assert ids[0, 1:].min() >= 1000 and ids[0, 1:].max() < 250_000
    with pytest.raises(ValueError, match="length >= 2"):
        analysis.repeated_random_tokens(key=jax.random.key(0), length=1)


def test_repeated_random_tokens_stay_inside_the_given_vocabulary():
    vocab = testing.TINY_CONFIG.vocab_size
    ids = analysis.repeated_random_tokens(
        key=jax.random.key(0), length=200, vocab_size=vocab
    )
    assert int(ids.max()) < vocab and int(ids[0, 1:].min()) >= vocab // 2
    testing.tiny_model()(ids)  # The ids index the tiny model's embedding.
    with pytest.raises(ValueError, match="high=600, vocab_size=512"):
        analysis.repeated_random_tokens(
            key=jax.random.key(0), vocab_size=vocab, high=600
        )
    with pytest.raises(ValueError, match="vocab_size must be an int >= 2"):
        analysis.repeated_random_tokens(key=jax.random.key(0), vocab_size=1)


def test_ablation_mask_zeroes_exactly_the_named_heads():
    mask = np.asarray(analysis.ablation_mask(testing.TINY_CONFIG, [(1, 2)]))
    assert mask.shape == (4, 4) and mask.sum() == 15 and mask[1, 2] == 0
    with pytest.raises(ValueError, match=r"got \(4, 0\)"):
        analysis.ablation_mask(testing.TINY_CONFIG, [(4, 0)])


@pytest.fixture(scope="module")
def tiny():
    return testing.tiny_model(seed=5)


@pytest.fixture(scope="module")
def tiny_tokens():
    ids = jax.random.randint(jax.random.key(2), (1, 20), 3, 512)
    return ids.at[:, 0].set(2)


def test_sequence_loss_equals_a_naive_cross_entropy(tiny, tiny_tokens):
    logits = np.asarray(tiny(tiny_tokens), np.float64)[0]
    ids = np.asarray(tiny_tokens)[0]
    logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
    logp = logits - logits.max(-1, keepdims=True) - logz[:, None]
    want = -np.mean([logp[t - 1, ids[t]] for t in range(5, 20)])
    got = analysis.sequence_loss(tiny, tiny_tokens, start=5)
    assert got == pytest.approx(want, abs=1e-5)


def test_ablating_a_head_equals_zeroing_its_rows_of_the_output_projection(
    tiny, tiny_tokens
):
    layer, head, h = 2, 1, testing.TINY_CONFIG.head_dim
    ablation = analysis.ablate_heads(
        tiny, tiny_tokens, [(layer, head)], start=3, progress=False
    )
    edited = testing.tiny_model(seed=5)
    kernel = edited.layers[layer].attn.o_proj.kernel
    kernel[...] = kernel[...].at[head * h : (head + 1) * h].set(0.0)
    want = analysis.sequence_loss(edited, tiny_tokens, start=3)
    assert ablation.losses[0] == pytest.approx(want, abs=1e-5)
    assert ablation.baseline == pytest.approx(
        analysis.sequence_loss(tiny, tiny_tokens, start=3)
    )
    assert ablation.increase[0] != 0.0


def naive_readout(model, residual):
    """Final RMSNorm (scale stored as offset from 1) and the tied head."""
    x = np.asarray(residual, np.float64)
    scale = 1.0 + np.asarray(model.final_norm.scale[...], np.float64)
    eps = model.config.norm_eps
    normed = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + eps) * scale
    return normed @ np.asarray(model.embedder.embedding[...], np.float64).T


def test_logit_lens_reads_every_layer_through_final_norm_and_tied_head(
    tiny, tiny_tokens
):
    cap = capture(tiny, tiny_tokens)
    lens = analysis.logit_lens(tiny, cap, position=7, top_k=3)
    assert lens.token_ids.shape == (4, 3) and lens.position == 7
    for row, layer in enumerate(cap.layers):
        logits = naive_readout(tiny, cap.residual[layer][0, 7])
        np.testing.assert_array_equal(
            lens.token_ids[row], np.argsort(-logits)[:3]
        )
    assert np.all(np.diff(lens.probs, axis=1) <= 0)
    top1 = np.argmax(np.asarray(cap.logits[0, 7]))
    assert lens.token_ids[-1, 0] == top1


def test_sample_heads_is_seeded_distinct_and_skips_excluded_heads():
    config = testing.TINY_CONFIG
    excluded = [(0, 0), (3, 3)]
    heads = analysis.sample_heads(
        config, 5, key=jax.random.key(4), exclude=excluded
    )
    assert len(set(heads)) == 5 and not set(heads) & set(excluded)
    assert heads == analysis.sample_heads(
        config, 5, key=jax.random.key(4), exclude=excluded
    )
    with pytest.raises(ValueError, match="count must be in"):
        analysis.sample_heads(config, 17, key=jax.random.key(0), exclude=[])


@pytest.fixture(scope="module")
def real_repeated(real_model):
    model, _ = real_model
    ids = analysis.repeated_random_tokens(key=jax.random.key(0), length=PERIOD)
    return ids, capture(model, ids)


def test_real_model_logit_lens_at_last_layer_is_its_top1_prediction(
    real_model, real_repeated
):
    model, _ = real_model
    _, cap = real_repeated
    lens = analysis.logit_lens(model, cap, position=-1)
    assert lens.layers[-1] == model.config.num_layers - 1
    assert lens.token_ids[-1, 0] == int(jnp.argmax(cap.logits[0, -1]))


def test_real_model_induction_head_matters_more_than_random_other_heads(
    real_model, real_repeated
):
    model, _ = real_model
    ids, cap = real_repeated
    scores = analysis.induction_scores(cap, PERIOD)
    best = scores.top(1)[0]
    assert scores[best] > 0.5

    # Non-induction heads: every head scoring under 0.2.
    candidates = scores.below(0.2)
    assert len(candidates) >= 60
    others = analysis.sample_heads(
        model.config,
        5,
        key=jax.random.key(1),
        exclude=sorted(set(scores.top(72)) - set(candidates)),
    )
    ablation = analysis.ablate_heads(
        model, ids, [best, *others], start=PERIOD + 1, progress=False
    )
    assert ablation.increase[0] > 0.1
    assert ablation.increase[0] > ablation.increase[1:].max()
