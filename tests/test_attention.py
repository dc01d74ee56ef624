import jax.numpy as jnp
import numpy as np

from gemma_lab.attention import (
    LayerCache,
    attend,
    attention_mask,
    attention_probs,
    resize_ring,
    rope,
    write_cache,
    write_token,
)


def naive_rope(x, positions, base, scale):
    """Rotate-half RoPE, one position and frequency at a time."""
    out = np.zeros_like(x)
    h = x.shape[-1]
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for i in range(h // 2):
                theta = positions[b, t] / scale / base ** (2 * i / h)
                c, s = np.cos(theta), np.sin(theta)
                a, z = x[b, t, :, i], x[b, t, :, i + h // 2]
                out[b, t, :, i] = a * c - z * s
                out[b, t, :, i + h // 2] = z * c + a * s
    return out


def test_rope_matches_naive_rotation_with_linear_scaling():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 5, 3, 8)).astype(np.float32)
    pos = np.array([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    out = rope(jnp.asarray(x), jnp.asarray(pos), base=10_000.0, scale=8.0)
    np.testing.assert_allclose(out, naive_rope(x, pos, 1e4, 8.0), atol=1e-5)


def test_local_mask_keeps_w_keys_counting_the_query():
    pos = jnp.arange(10)[None]
    mask = np.asarray(attention_mask(pos, pos, window=3))[0]
    assert mask[9].tolist() == [False] * 7 + [True] * 3
    assert not mask[np.triu_indices(10, 1)].any()


def test_padding_queries_and_keys_are_masked():
    pos = jnp.array([[-1, 0, 1]])
    mask = np.asarray(attention_mask(pos, pos, window=None))[0]
    assert mask.tolist() == [
        [False, False, False],
        [False, True, False],
        [False, True, True],
    ]


def test_groups_attend_both_ways_and_never_to_later_groups():
    pos = jnp.arange(6)[None]
    groups = jnp.array([[0, 1, 1, 0, 2, 2]])
    mask = np.asarray(
        attention_mask(
            pos, pos, window=None, query_groups=groups, key_groups=groups
        )
    )[0]
    assert mask[1, 2] and mask[4, 5]
    assert not mask[1, 4] and not mask[0, 1]


def test_fully_masked_rows_stay_finite_and_masked_keys_get_zero():
    q = jnp.ones((1, 2, 2, 4))
    k = jnp.ones((1, 2, 1, 4))
    mask = jnp.array([[[False, False], [True, False]]])
    probs = np.asarray(attention_probs(q, k, mask))
    assert np.isfinite(probs).all()
    assert probs[0, :, 1, 1].tolist() == [0.0, 0.0]


def test_write_cache_keeps_the_newest_position_in_each_ring_slot():
    cache = LayerCache.empty(1, 4, 1, 1, jnp.float32)
    pos = jnp.arange(6)[None]
    keys = pos[..., None, None].astype(jnp.float32)
    cache = write_cache(cache, keys, keys, pos)
    assert np.asarray(cache.positions)[0].tolist() == [4, 5, 2, 3]
    assert np.asarray(cache.keys)[0, :, 0, 0].tolist() == [4, 5, 2, 3]

    step = jnp.array([[6]])
    cache = write_cache(cache, step[..., None, None] * 1.0, step * 1.0, step)
    assert np.asarray(cache.positions)[0].tolist() == [4, 5, 6, 3]


def test_write_token_equals_write_cache_for_one_token_and_skips_padding():
    cache = LayerCache.empty(3, 4, 2, 3, jnp.float32)
    cache = write_cache(
        cache,
        jnp.ones((3, 5, 2, 3)),
        jnp.ones((3, 5, 2, 3)),
        jnp.array([[0, 1, 2, 3, 4], [0, 1, -1, -1, -1], [0, 1, 2, 3, -1]]),
    )
    pos = jnp.array([[5], [-1], [4]])
    keys = jnp.arange(18.0).reshape(3, 1, 2, 3)
    want = write_cache(cache, keys, -keys, pos)
    got = write_token(cache, keys, -keys, pos)
    for field in ("keys", "values", "positions"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert np.asarray(got.positions).tolist() == [
        [4, 5, 2, 3],
        [0, 1, -1, -1],
        [4, 1, 2, 3],
    ]


def test_a_resized_ring_holds_and_takes_tokens_as_the_full_one():
    ring = LayerCache.empty(2, 8, 1, 2, jnp.float32)
    ring = write_cache(
        ring,
        jnp.ones((2, 3, 1, 2)),
        jnp.ones((2, 3, 1, 2)),
        jnp.array([[0, 1, 2], [0, 1, -1]]),
    )
    pos = jnp.array([[3], [2]])
    keys = jnp.arange(4.0).reshape(2, 1, 1, 2)

    small = resize_ring(ring, 4)
    assert small.keys.shape == (2, 4, 1, 2) and small.positions.shape == (2, 4)
    got = resize_ring(write_token(small, keys, -keys, pos), 8)
    want = write_token(ring, keys, -keys, pos)
    for field in ("keys", "values", "positions"):
        np.testing.assert_array_equal(getattr(got, field), getattr(want, field))
    assert resize_ring(ring, 8) is ring
    grown = resize_ring(ring, 10)
    assert np.asarray(grown.positions)[:, 8:].tolist() == [[-1, -1]] * 2


def test_write_cache_skips_padding():
    cache = LayerCache.empty(1, 4, 1, 1, jnp.float32)
    pos = jnp.array([[-1, -1, 0, 1]])
    keys = jnp.arange(4.0).reshape(1, 4, 1, 1)
    cache = write_cache(cache, keys, keys, pos)
    assert np.asarray(cache.positions)[0].tolist() == [0, 1, -1, -1]
    assert np.asarray(cache.keys)[0, :2, 0, 0].tolist() == [2.0, 3.0]


def test_grouped_query_attention_matches_a_naive_loop():
    rng = np.random.default_rng(0)
    b, t, s, n, k, h = 2, 3, 5, 4, 2, 8
    queries = rng.standard_normal((b, t, n, h)).astype(np.float32)
    keys = rng.standard_normal((b, s, k, h)).astype(np.float32)
    values = rng.standard_normal((b, s, k, h)).astype(np.float32)
    mask = rng.random((b, t, s)) < 0.7
    mask[..., 0] = True
    got = attend(attention_probs(queries, keys, mask), values)

    want = np.zeros((b, t, n, h))
    for i in range(b):
        for j in range(n):
            kv = j // (n // k)  # query head j reads KV head j // G
            scores = queries[i, :, j] @ keys[i, :, kv].T  # [T, S]
            scores = np.where(mask[i], scores, -np.inf)
            probs = np.exp(scores - scores.max(-1, keepdims=True))
            probs /= probs.sum(-1, keepdims=True)
            want[i, :, j] = probs @ values[i, :, kv]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
