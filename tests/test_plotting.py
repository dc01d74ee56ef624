"""Plotting helpers and the widgets built on them (drawn headless)."""

import re

import jax
import matplotlib
import numpy as np
import pytest

from gemma_lab import analysis, plotting, testing, widgets
from gemma_lab.capture import capture

matplotlib.use("Agg")

T = 12


class FakeTokenizer:
    def id_to_piece(self, i):
        pieces = {0: "\u2581the", 1: "\n", 2: "<bos>", 3: "\u0995", 4: "é" * 20}
        return pieces.get(i, f"t{i}")


@pytest.fixture(scope="module")
def tiny():
    return testing.tiny_model(seed=1)


@pytest.fixture(scope="module")
def tiny_capture(tiny):
    ids = jax.random.randint(jax.random.key(0), (1, T), 3, 512)
    return capture(tiny, ids.at[:, 0].set(2))


@pytest.fixture(scope="module")
def labels():
    return [f"w{i}" for i in range(T)]


def test_token_labels_show_word_marks_as_spaces_and_escape_newlines():
    ids = np.array([[2, 0, 1, 7, 3, 4]])
    got = plotting.token_labels(FakeTokenizer(), ids)
    # U+0995 (Bengali) has no glyph in matplotlib's default font.
    assert got == ["<bos>", " the", "\\n", "t7", "\\u0995", "é" * 11 + "…"]


def test_plot_head_labels_tokens_and_names_layer_and_head(tiny_capture, labels):
    ax = plotting.plot_head(
        tiny_capture.probs(1, 2),
        labels,
        layer=1,
        head=2,
        config=testing.TINY_CONFIG,
    )
    assert ax.get_title() == "layer 1, head 2 (global)"
    assert [t.get_text() for t in ax.get_xticklabels()] == labels
    assert [t.get_text() for t in ax.get_yticklabels()] == labels
    np.testing.assert_array_equal(
        ax.images[0].get_array(), tiny_capture.probs(1, 2)
    )


def test_plot_head_thins_labels_on_long_sequences():
    probs = np.tril(np.ones((100, 100))) / np.arange(1, 101)[:, None]
    ax = plotting.plot_head(
        probs, [f"x{i}" for i in range(100)], layer=0, head=0, max_ticks=20
    )
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert len(ticks) == 20 and ticks[1] == "x5 [5]"


def test_plot_head_log_scale_leaves_masked_keys_blank(tiny_capture, labels):
    probs = tiny_capture.probs(0, 0)
    ax = plotting.plot_head(probs, labels, layer=0, head=0, log=True)
    shown = ax.images[0].get_array()
    np.testing.assert_array_equal(np.ma.getmaskarray(shown), probs == 0.0)


def test_plot_layer_draws_one_titled_panel_per_head(tiny_capture, labels):
    fig = plotting.plot_layer(
        tiny_capture, 2, labels, ncols=2, config=testing.TINY_CONFIG
    )
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == [f"layer 2, head {h} (local, W=8)" for h in range(4)]


def test_plot_heads_rejects_an_empty_selection(tiny_capture, labels):
    with pytest.raises(ValueError, match="at least one"):
        plotting.plot_heads(tiny_capture, [], labels)


def test_plot_head_scores_labels_layers_heads_and_values():
    scores = analysis.HeadScores(
        np.array([[0.1, 0.9], [0.3, 0.0]]), (0, 5), "induction score"
    )
    config = testing.TINY_CONFIG
    fig = plotting.plot_head_scores(scores, config=config)
    ax = fig.axes[0]
    assert ax.get_title() == "induction score per head"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "5"]
    assert [t.get_text() for t in ax.texts] == ["0.10", "0.90", "0.30", "0.00"]


def test_plot_logit_lens_writes_each_layers_top_tokens():
    lens = analysis.LogitLens(
        (0, 1),
        np.array([[0, 7], [1, 2]]),
        np.array([[0.6, 0.1], [0.9, 0.05]]),
        position=3,
    )
    fig = plotting.plot_logit_lens(lens, FakeTokenizer())
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == [" the", "t7", "\\n", "<bos>"]
    assert ax.get_title() == "logit lens at position 3"


def test_plot_ablation_draws_the_loss_rise_per_head():
    ablation = analysis.Ablation(
        ((5, 1), (2, 0)), np.array([2.5, 1.0]), baseline=1.2, start=51
    )
    ax = plotting.plot_ablation(ablation).axes[0]
    heights = [patch.get_height() for patch in ax.patches]
    np.testing.assert_allclose(heights, [1.3, -0.2])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["L5 H1", "L2 H0"]


def test_attention_html_shades_tokens_without_scripts_or_links():
    page = widgets.attention_html(
        ["a", "<b>", "c"], np.array([0.25, 0.75, 0.0]), query=2
    )
    alphas = re.findall(r"rgba\(68, 1, 84, ([0-9.]+)\)", page)
    assert alphas == ["0.333", "1.000", "0.000"]
    assert "&lt;b&gt;" in page and "outline: 2px solid red" in page
    assert "<script" not in page and "http" not in page


def test_explorer_follows_its_sliders_and_token_selector(tiny_capture, labels):
    explorer = widgets.AttentionExplorer(tiny_capture, labels)
    assert explorer.query.value == T - 1
    explorer.layer.value, explorer.head.value, explorer.query.value = 3, 1, 5
    want = np.asarray(tiny_capture.attention[3][0, 1, 5])
    np.testing.assert_array_equal(explorer.weights(), want)
    assert explorer.text.value == widgets.attention_html(labels, want, query=5)
    assert bytes(explorer.image.value).startswith(b"\x89PNG")


def test_explorer_rejects_token_lists_of_the_wrong_length(tiny_capture):
    with pytest.raises(ValueError, match="one string per key"):
        widgets.AttentionExplorer(tiny_capture, ["a"])


def test_model_view_renders_offline_treescope_html(tiny):
    page = widgets.model_view(tiny, params_only=True).data
    assert "<script" in page  # treescope's own renderer, inline
    assert not re.search(r"src=[\"']?https?:", page)
    with pytest.raises(TypeError, match="nnx.Module"):
        widgets.model_view({"not": "a module"})


def test_plot_answers_colours_titles_by_the_answer_after_a_rationale():
    from gemma_lab import vision_plots

    images = [np.zeros((8, 8, 3), np.uint8)] * 3
    fig = vision_plots.plot_answers(
        images,
        ["is there a red shape?", "is there a circle?", "what shape?"],
        ["a blue shape: no", "a circle: no", "circle"],
        ["no", "yes", "circle"],
    )

    titles = [ax.title for ax in fig.axes[:3]]
    assert [t.get_color() for t in titles] == ["green", "red", "green"]
    assert "model: a blue shape: no" in titles[0].get_text()
