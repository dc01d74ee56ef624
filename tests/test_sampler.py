"""Tests of gemma_lab.sampler: sampling functions, cache, batches, streams.

Real-model tests share one sampler and one cache length (1024), so the
prefill and decode steps compile only a few times for the whole module.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_lab import testing
from gemma_lab.decoding import bucket_length, live_slots
from gemma_lab.layers import greedy_tokens
from gemma_lab.results import stable_text
from gemma_lab.sampler import DEFAULT_STOP_IDS, Sampler, greedy
from gemma_lab.sampling import top_k_logits, top_p_logits

MAX_LEN = 1024
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def sampler(real_model):
    model, tokenizer = real_model
    return Sampler(model, tokenizer)


@pytest.fixture(scope="module")
def long_ids(real_model):
    """A 600-token prompt of ordinary prose."""
    _, tokenizer = real_model
    text = " ".join(
        f"Paragraph {i}: the river ran past the old mill and the town."
        for i in range(80)
    )
    ids = tokenizer.encode(text)
    assert len(ids) >= 600
    return ids[:600]


def _recomputed_logits(model, ids, steps):
    """Next-token logits of the last `steps` prefixes, without a cache.

    The model is causal, so one cache-free pass over the whole sequence
    gives, at each position, the logits of recomputing that prefix alone.
    """
    tokens = jnp.asarray([ids], jnp.int32)
    hidden = model.forward(tokens, return_logits=False).hidden
    start = len(ids) - steps
    return np.asarray(model.logits(hidden[0, start - 1 : len(ids) - 1]))


# Pure functions.


def test_bucket_length_rounds_up_to_powers_then_multiples_of_512():
    assert [bucket_length(n) for n in (1, 32, 33, 512, 513, 1100)] == [
        32,
        32,
        64,
        512,
        1024,
        1536,
    ]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="n must be an int >= 1"):
            bucket_length(bad)


def test_live_slots_grow_by_four_and_stay_within_the_cache():
    sizes = [live_slots(n, 1024) for n in (1, 128, 129, 512, 513, 5000)]
    assert sizes == [128, 128, 512, 512, 1024, 1024]
    assert live_slots(10, 64) == 64


def test_greedy_tokens_equal_argmax_with_ties_and_nan():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((6, 1000)).astype(np.float32)
    logits[1, [7, 300]] = 9.0  # a tie: the first index wins
    logits[2, :] = -np.inf
    logits[3, [5, 900]] = np.nan  # NaN counts as largest, first one wins
    logits[4, 999] = np.inf
    got = np.asarray(greedy_tokens(jnp.asarray(logits)))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    np.testing.assert_array_equal(got[:4], [got[0], 7, 0, 5])
    assert got.dtype == np.int32


def test_greedy_tokens_find_a_nan_after_the_largest_logit_of_a_long_row():
    # XLA's CPU max skips NaN in rows this long; argmax still picks it.
    logits = np.random.default_rng(1).standard_normal((2, 262144))
    logits = logits.astype(np.float32)
    logits[:, 1000] = 50.0
    logits[0, 200000] = np.nan
    got = np.asarray(greedy_tokens(jnp.asarray(logits)))
    assert got.tolist() == [200000, 1000]


def test_top_k_keeps_exactly_the_k_largest_logits():
    logits = jnp.asarray([[0.1, 3.0, -1.0, 2.0, 0.5]])
    kept = np.isfinite(np.asarray(top_k_logits(logits, 2)))
    np.testing.assert_array_equal(kept, [[False, True, False, True, False]])


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    probs = np.asarray([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.log(jnp.asarray(probs))
    assert np.isfinite(np.asarray(top_p_logits(logits, 0.7))).tolist() == [
        [True, True, False, False]
    ]
    assert np.isfinite(np.asarray(top_p_logits(logits, 1e-6))).tolist() == [
        [True, False, False, False]
    ]


def test_top_p_of_one_keeps_every_token_of_a_peaked_vocabulary():
    # The float32 running sum reaches 1 long before the last of 262,144.
    logits = 8 * jax.random.normal(jax.random.key(0), (2, 262144))
    assert bool(jnp.isfinite(top_p_logits(logits, 1.0)).all())
    assert bool(jnp.isfinite(top_p_logits(logits, jnp.float32(1))).all())


def test_stable_text_holds_back_partial_characters_and_stop_prefixes():
    assert stable_text("ab\ufffd\ufffd") == "ab"
    assert stable_text("hello wor", ["world"]) == "hello "
    assert stable_text("hello", ["world"]) == "hello"


def test_stable_prefixes_of_byte_fallback_tokens_rebuild_the_text(
    real_model,
):
    _, tokenizer = real_model
    text = "a\U00010348b\u0fd5"  # Both characters fall back to bytes.
    ids = tokenizer.encode(text, add_bos=False)
    assert len(ids) > 4
    emitted = ""
    for n in range(1, len(ids) + 1):
        stable = stable_text(tokenizer.decode(ids[:n]))
        assert stable.startswith(emitted) and "\ufffd" not in stable
        emitted = stable
    assert emitted == text


# Cached decoding on the tiny model.


def test_tiny_cached_greedy_equals_recomputing_the_prefix():
    model = testing.tiny_model(3)
    prompt = [2, 17, 99, 4, 250, 31, 8, 9, 10, 11]
    got = greedy(model, prompt, max_new_tokens=12, stop_ids=())
    # One cache-free causal pass recomputes every prefix at once.
    logits = model(jnp.asarray([prompt + got]))[0, len(prompt) - 1 : -1]
    assert got == np.argmax(np.asarray(logits), axis=-1).tolist()


def test_invalid_settings_raise_before_work():
    sampler = Sampler(testing.tiny_model(0))
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampler.generate([2, 3], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        sampler.generate([2, 3], max_new_tokens=2, top_p=0.0)
    with pytest.raises(ValueError, match="exceeds the cache length 64"):
        sampler.generate(list(range(2, 62)), max_new_tokens=8, max_len=64)
    with pytest.raises(ValueError, match="empty"):
        sampler.generate([[2, 3], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature"):
        sampler.generate([2, 3], max_new_tokens=2, temperature=float("nan"))
    with pytest.raises(ValueError, match="vocabulary size 512"):
        sampler.generate([2, 3], max_new_tokens=2, top_k=10_000)
    with pytest.raises(ValueError, match=r"outside \[0, 512\): min 2, max 600"):
        sampler.generate([2, 600], max_new_tokens=2)
    with pytest.raises(ValueError, match="min -5"):
        sampler.generate([2, -5], max_new_tokens=2)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(max_len=7.5), "max_len must be an int >= 1 or None, got 7.5"),
        (dict(max_len=-5), "max_len must be an int >= 1 or None, got -5"),
        (dict(stop_ids=1), "stop_ids must be a sequence of token ids"),
        (dict(stop_ids=[1, 600]), r"in \[0, 512\), got \[1, 600\]"),
        (dict(seed=2**70), r"seed must be an int in \[0, 2\*\*32\)"),
        (dict(seed=-1), "seed must be an int"),
        (dict(max_new_tokens=True), "max_new_tokens must be an int >= 1"),
        (dict(top_k=True), "top_k must be an int"),
        (dict(temperature=float("inf")), "temperature must be a finite"),
        (dict(temperature="0.5"), "temperature must be a finite"),
        (dict(return_logits=1), "return_logits must be a bool"),
    ],
)
def test_bad_argument_types_are_named(settings, message):
    sampler = Sampler(testing.tiny_model(0))
    settings = dict(max_new_tokens=2) | settings
    with pytest.raises(ValueError, match=message):
        sampler.generate([2, 3], **settings)


def test_stream_takes_the_arguments_of_generate():
    sampler = Sampler(testing.tiny_model(0), testing.CharTokenizer())
    with pytest.raises(TypeError, match="stream.*'max_new_tokens'"):
        sampler.stream("Hi")
    stream = sampler.stream("Hi", max_new_tokens=3, stop_ids=())
    "".join(stream)
    assert len(stream.result.tokens[0]) == 3
    with pytest.raises(TypeError, match=r"stream\(\) got an unexpected"):
        sampler.stream("Hi", max_new_tokens=2, temprature=0.5)
    with pytest.raises(ValueError, match="seed"):
        sampler.stream("Hi", max_new_tokens=2, seed=2**70)


def test_greedy_of_an_empty_prompt_is_an_error():
    model = testing.tiny_model(0)
    assert greedy(model, [2, 3], max_new_tokens=0) == []
    with pytest.raises(ValueError, match="prompt is empty"):
        greedy(model, [], max_new_tokens=0)


def test_truncate_keeps_bos_and_the_newest_tokens():
    sampler = Sampler(testing.tiny_model(0))
    prompt = [2, *range(10, 70)]
    kept = [2, *range(70 - 55, 70)]
    kw = dict(max_new_tokens=8, max_len=64, stop_ids=())
    a = sampler.generate(prompt, truncate=True, **kw)
    b = sampler.generate(kept, **kw)
    assert a.tokens == b.tokens and a.lengths == [56 + 7]


# The real 270M.


def test_default_stop_ids_are_eos_and_end_of_turn():
    assert 1 in DEFAULT_STOP_IDS and 106 in DEFAULT_STOP_IDS


@pytest.mark.parametrize("prompt_len,new", [(600, 16), (500, 30)])
def test_cached_decoding_equals_recomputing_the_prefix(
    real_model, sampler, long_ids, prompt_len, new
):
    model, _ = real_model
    ids = long_ids[:prompt_len]
    result = sampler.generate(
        ids, max_new_tokens=new, stop_ids=(), return_logits=True
    )
    assert len(result.tokens[0]) == new
    assert result.lengths == [prompt_len + new - 1]
    expected = _recomputed_logits(model, ids + result.tokens[0], new)
    np.testing.assert_allclose(result.logits[0], expected, atol=1e-3)


def test_decoding_in_a_long_cache_reads_its_live_slots_exactly(
    real_model, sampler, long_ids
):
    # Positions 100 to 139 in 1024 slots: the prefill and the first decode
    # steps run on rings of 128 slots, the later ones on 512.
    model, _ = real_model
    ids = long_ids[:100]
    result = sampler.generate(
        ids, max_new_tokens=40, max_len=MAX_LEN, stop_ids=(),
        return_logits=True,
    )  # fmt: skip
    expected = _recomputed_logits(model, ids + result.tokens[0], 40)
    np.testing.assert_allclose(result.logits[0], expected, atol=1e-3)
    assert result.tokens[0] == np.argmax(expected, axis=-1).tolist()


def test_greedy_picks_without_logits_equal_those_from_the_logits(sampler):
    rows = ["The capital of France is", "One, two, three,", "Once upon a"]
    kw = dict(max_new_tokens=12, stop_ids=(), max_len=MAX_LEN)
    fast = sampler.generate(rows, **kw)  # picks inside the output head
    slow = sampler.generate(rows, return_logprobs=True, **kw)
    assert fast.tokens == slow.tokens


def test_ragged_batch_rows_equal_single_prompt_runs(
    real_model, sampler, long_ids
):
    _, tokenizer = real_model
    rows = [[tokenizer.bos_id], long_ids]
    kw = dict(max_new_tokens=16, stop_ids=(), return_logits=True)
    batch = sampler.generate(rows, max_len=MAX_LEN, **kw)
    assert np.isfinite(batch.logits).all()
    for i, row in enumerate(rows):
        alone = sampler.generate(row, max_len=MAX_LEN, **kw)
        assert batch.tokens[i] == alone.tokens[0]
        np.testing.assert_allclose(batch.logits[i], alone.logits[0], atol=1e-3)


def test_greedy_continues_a_prompt_with_the_known_answer(sampler):
    result = sampler.generate(PROMPT, max_new_tokens=8, max_len=MAX_LEN)
    assert "France" in result.text and result.finish_reasons == ["length"]


def test_an_empty_text_samples_from_bos_alone(sampler):
    bos = sampler.tokenizer.bos_id
    text = sampler.generate("", max_new_tokens=4, max_len=MAX_LEN)
    ids = sampler.generate([[bos]], max_new_tokens=4, max_len=MAX_LEN)
    assert text.tokens == ids.tokens and len(text.tokens[0]) == 4
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        sampler.generate([[]], max_new_tokens=4, max_len=MAX_LEN)


def test_top_k_1_and_tiny_top_p_equal_greedy(sampler):
    kw = dict(max_new_tokens=8, max_len=MAX_LEN)
    greedy_ids = sampler.generate(PROMPT, **kw).tokens
    top_k = sampler.generate(PROMPT, temperature=1.0, top_k=1, seed=5, **kw)
    top_p = sampler.generate(PROMPT, temperature=1.0, top_p=1e-6, seed=5, **kw)
    assert top_k.tokens == greedy_ids and top_p.tokens == greedy_ids


def test_same_seed_same_sample_and_different_seeds_differ(sampler):
    kw = dict(max_new_tokens=12, max_len=MAX_LEN, temperature=1.0)
    first = sampler.generate(PROMPT, seed=1, **kw).tokens
    again = sampler.generate(PROMPT, seed=1, **kw).tokens
    other = sampler.generate(PROMPT, seed=2, **kw).tokens
    assert first == again and first != other


def test_streaming_yields_the_same_tokens_and_text(sampler):
    kw = dict(max_new_tokens=12, max_len=MAX_LEN, temperature=1.0, seed=3)
    whole = sampler.generate(PROMPT, **kw)
    stream = sampler.stream(PROMPT, **kw)
    pieces = list(stream)
    assert stream.result.tokens == whole.tokens
    assert "".join(pieces) == whole.text


def test_multi_token_stop_string_cuts_the_text(sampler):
    kw = dict(max_new_tokens=12, max_len=MAX_LEN)
    full = sampler.generate(PROMPT, **kw).text
    stop = full[6:14]  # Several tokens long.
    cut = sampler.generate(PROMPT, stop_strings=[stop], **kw)
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reasons == ["stop_string"]
    # A single string is one stop string, not a set of characters.
    assert sampler.generate(PROMPT, stop_strings=stop, **kw).text == cut.text
    streamed = "".join(sampler.stream(PROMPT, stop_strings=[stop], **kw))
    assert streamed == cut.text


def test_logprobs_are_the_models_log_softmax(sampler):
    result = sampler.generate(
        PROMPT,
        max_new_tokens=4,
        max_len=MAX_LEN,
        return_logprobs=True,
        return_logits=True,
    )
    logits = result.logits[0]
    expected = jax.nn.log_softmax(logits)[np.arange(4), result.tokens[0]]
    np.testing.assert_allclose(result.logprobs[0], expected, atol=1e-5)


def _tiny_sampler():
    return Sampler(testing.tiny_model(0), testing.CharTokenizer())


def test_stream_takes_id_arrays_like_generate():
    sampler = _tiny_sampler()
    for ids in (np.array([2, 3]), jnp.array([2, 3])):
        pieces = sampler.stream(ids, max_new_tokens=2)
        "".join(pieces)
        want = sampler.generate([2, 3], max_new_tokens=2)
        assert pieces.result.tokens == want.tokens


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([2, 3.7, 4], r"the prompt holds 3.7 at index 1; expected int"),
        ([2, True], r"the prompt holds True at index 1"),
        ([2, "a"], r"the prompt holds 'a' at index 1"),
        ([[2, 3], [2, 1.5]], r"prompts\[1\] holds 1.5 at index 1"),
        (5, "prompts must be a str, a sequence of int ids, or a list"),
        (None, "prompts must be a str, a sequence of int ids, or a list"),
        ([5], None),
    ],
)
def test_prompts_must_be_texts_or_int_ids(prompts, match):
    sampler = _tiny_sampler()
    if match is None:
        sampler.generate(prompts, max_new_tokens=1)
        return
    with pytest.raises(TypeError, match=match):
        sampler.generate(prompts, max_new_tokens=1)


def test_stream_rejects_a_number():
    with pytest.raises(ValueError, match="stream takes one prompt.*got 5"):
        _tiny_sampler().stream(5, max_new_tokens=1)


def test_start_truncate_and_cache_are_checked():
    sampler = _tiny_sampler()
    first = sampler.generate([2, 3], max_new_tokens=2, max_len=16)
    again = sampler.generate(
        [4], max_new_tokens=1, cache=first.cache,
        start=np.int64(first.lengths[0]),
    )  # fmt: skip
    assert len(again.tokens[0]) == 1
    for start in (1.5, True):
        with pytest.raises(TypeError, match="start must be an int"):
            sampler.generate([4], max_new_tokens=1, start=start)
    with pytest.raises(TypeError, match="truncate must be a bool, got 1"):
        sampler.generate([4], max_new_tokens=1, truncate=1)
    with pytest.raises(TypeError, match="cache must be a Cache"):
        sampler.generate([4], max_new_tokens=1, cache="x")


def test_sampler_checks_its_model_and_tokenizer():
    with pytest.raises(TypeError, match="model must be a gemma_lab"):
        Sampler(None)
    with pytest.raises(TypeError, match="tokenizer must be a gemma_lab"):
        Sampler(testing.tiny_model(0), "x")
