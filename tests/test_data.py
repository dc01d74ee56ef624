"""BBC News topic examples, user JSONL, encoding and exact match."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_lab import data, testing, training


def test_bbc_news_topics_cover_five_topics_without_overlap():
    train, held_out = data.bbc_news_topics(num_held_out=50, seed=0)
    # 2,225 files, of which 2,107 distinct title + lead prompts.
    assert len(train) + len(held_out) == 2107
    assert {e.answer for e in train} == set(data.TOPICS)
    assert not {e.prompt for e in held_out} & {e.prompt for e in train}
    example = held_out[0]
    assert example.prompt.startswith("<start_of_turn>user\n")
    assert example.prompt.endswith("<start_of_turn>model\n")
    assert example.response == example.answer + "<end_of_turn>"


def test_held_out_split_is_chosen_by_the_seed():
    _, a = data.bbc_news_topics(num_held_out=20, seed=0)
    _, b = data.bbc_news_topics(num_held_out=20, seed=0)
    _, c = data.bbc_news_topics(num_held_out=20, seed=1)
    assert a == b
    assert a != c


def test_no_bbc_file_carries_a_canary_string():
    folder = data.bbc_news_folder()
    texts = [p.read_text(errors="ignore") for p in folder.rglob("*.txt")]
    assert len(texts) == 2225
    assert not any(data.has_canary(t) for t in texts)
    assert data.has_canary("BIG-bench canary GUID 26b5c67b")
    assert not data.has_canary("offices at Canary Wharf")


def test_read_jsonl_takes_pairs_and_chat_turns(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [
        {"prompt": "2+2?", "response": "4"},
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Name?"},
                {"role": "model", "content": "Gemma"},
            ]
        },
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    first, second = data.read_jsonl(path)
    assert first.prompt == (
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    )
    assert first.response == "4<end_of_turn>"
    assert second.prompt.count("<start_of_turn>model\n") == 2
    assert second.answer == "Gemma"


def test_read_jsonl_names_the_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        data.read_jsonl(path)


def _turns(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"prompt": 5, "response": "b"}, "'prompt' is 5; expected a string"),
        ({"prompt": None, "response": "b"}, "'prompt' is None"),
        ({"prompt": "  ", "response": "b"}, "'prompt' is empty"),
        ({"messages": "hi"}, "'messages' is 'hi'; expected a list"),
        ({"messages": ["hi", "yo"]}, r"messages\[0\] is 'hi'"),
        ({"messages": [{"role": "user"}]}, r"messages\[0\] \(user\)"),
        ({"messages": [{"content": "x"}]}, "has role None"),
        (_turns(("user", "a"), ("user", "b")), "roles must alternate"),
        (_turns(("model", "a")), "expected a user turn"),
        (_turns(("user", 5), ("model", "b")), "has content 5"),
        (_turns(("user", "a")), "ending with the model's message"),
        (_turns(("user", "a"), ("model", "b"), ("user", "c")), "ending"),
        ({"prompt": "a", "response": ""}, "'response' is empty"),
        ({"prompt": "a", "response": " \n"}, "'response' is empty"),
        (_turns(("user", "a"), ("model", "")), "final model message is empty"),
        (
            {"prompt": "a", "response": "b", **_turns(("user", "a"))},
            "both 'prompt' and 'messages'",
        ),
        (
            {"prompt": "a\ud800", "response": "b"},
            r"'prompt': text is not valid UTF-8: '\\ud800' at position 1",
        ),
        (
            _turns(("system", "s"), ("user", "a"), ("model", "\udc80")),
            r"messages\[2\].content: text is not valid UTF-8",
        ),
    ],
)
def test_read_jsonl_names_the_line_of_a_bad_record(tmp_path, record, message):
    path = tmp_path / "mine.jsonl"
    good = {"prompt": "a", "response": "b"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match="mine.jsonl line 2: .*" + message):
        data.read_jsonl(path)


def test_read_jsonl_folds_a_system_message_and_reads_a_bom(tmp_path):
    path = tmp_path / "bom.jsonl"
    record = _turns(("system", "Be brief."), ("user", "Hi"), ("model", "Yo"))
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(record).encode() + b"\n")
    [example] = data.read_jsonl(path)
    assert example.prompt == (
        "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert example.answer == "Yo"


def test_read_jsonl_rejects_other_encodings_and_folders(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "caf\xe9"}')
    with pytest.raises(ValueError, match=r"latin.jsonl line 2 is not UTF-8"):
        data.read_jsonl(path)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        data.read_jsonl(tmp_path)


def test_encode_keeps_the_response_and_the_turn_markers():
    example = data.Example("p" * 100 + "<end>", "yes<end_of_turn>")
    tokenizer = testing.CharTokenizer()
    [(ids, prompt_len)] = data.encode(tokenizer, [example], seq_len=40)
    assert len(ids) == 40
    assert tokenizer.decode(ids[prompt_len:]) == "yes<end_of_turn>"
    assert tokenizer.decode(ids[prompt_len - 5 : prompt_len]) == "<end>"


def test_exact_match_scores_greedy_answers(monkeypatch):
    examples = [
        data.Example("q1", "a<end_of_turn>"),
        data.Example("q2", "b<end_of_turn>"),
    ]
    monkeypatch.setattr(data, "greedy_answers", lambda *a, **k: ["a", "c"])
    result = data.exact_match(None, testing.CharTokenizer(), examples)
    assert result.accuracy == 0.5
    assert result.references == ["a", "b"]


def test_greedy_answers_match_the_cache_free_reference():
    model = testing.tiny_model()
    tokenizer = testing.CharTokenizer()
    prompts = ["ab", "hello there"]
    answers = data.greedy_answers(
        model,
        tokenizer,
        prompts,
        max_new_tokens=2,
        batch_size=2,
        progress=False,
    )
    for prompt, answer in zip(prompts, answers, strict=True):
        ids = _naive_greedy(model, tokenizer.encode(prompt), 2)
        cut = next((i for i, t in enumerate(ids) if t in (1, 106)), len(ids))
        assert answer == tokenizer.decode(ids[:cut]).strip()


def _naive_greedy(model, prompt, steps):
    """Greedy ids by recomputing the whole prefix each step, no cache."""
    ids = list(prompt)
    for _ in range(steps):
        logits = model(jnp.asarray([ids], jnp.int32))
        ids.append(int(jnp.argmax(logits[0, -1])))
    return ids[len(prompt) :]


def test_encoded_examples_make_batches_with_response_masks():
    train, _ = data.bbc_news_topics(num_held_out=10)
    encoded = data.encode(testing.CharTokenizer(), train[:3], seq_len=256)
    batch = training.make_batch(encoded, seq_len=256)
    for row, (ids, prompt_len) in enumerate(encoded):
        masked = batch.labels[row][batch.loss_mask[row]]
        np.testing.assert_array_equal(masked, ids[prompt_len:])


@pytest.mark.parametrize("content", ["", "\n", "  \n\n"])
def test_read_jsonl_rejects_a_file_without_records(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match="empty.jsonl' holds no records"):
        data.read_jsonl(path)


def test_read_jsonl_rejects_an_empty_or_missing_path():
    with pytest.raises(ValueError, match="path must name a JSONL file, got ''"):
        data.read_jsonl("")
    with pytest.raises(TypeError, match="path must be a str .*got None"):
        data.read_jsonl(None)
