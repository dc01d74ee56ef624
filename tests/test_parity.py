"""gemma_lab against transformers on the real Gemma 3 270M (same GGUF file)."""

import inspect
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from gemma_lab.sampler import greedy

torch = pytest.importorskip("torch")

TEXTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Résumé: 東京 is a city; emoji 🙂 and\ttabs   spaces.",
    # Real prose and code, long enough (> 512 tokens) for the window to matter.
    inspect.getsource(textwrap)[:4000],
]


def reference_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("text", TEXTS, ids=["short", "code", "mixed", "long"])
def test_logits_match_transformers(real_model, hf_model, text):
    model, tokenizer = real_model
    ids = tokenizer.encode(text)
    expected = reference_logits(hf_model, ids)
    got = np.asarray(model(jnp.asarray([ids]))[0])

    error = np.abs(got - expected).max(axis=-1)
    assert error[:512].max() < 1e-3
    if len(ids) > 512:
        assert error[512:].max() < 5e-3

    # Same argmax wherever the reference's top two are clearly apart.
    top2 = np.sort(expected, axis=-1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.01
    same = got.argmax(-1) == expected.argmax(-1)
    assert same[clear].all()


def test_long_text_crosses_the_window(real_model):
    _, tokenizer = real_model
    assert len(tokenizer.encode(TEXTS[-1])) > 600


@pytest.mark.parametrize(
    "prompt",
    ["The capital of France is", "def fibonacci(n):", "Once upon a time"],
)
def test_greedy_continuations_match_transformers(real_model, hf_model, prompt):
    model, tokenizer = real_model
    ids = tokenizer.encode(prompt)
    with torch.no_grad():
        out = hf_model.generate(
            torch.tensor([ids]),
            max_new_tokens=32,
            min_new_tokens=32,
            do_sample=False,
        )
    expected = out[0, len(ids) :].tolist()
    got = greedy(model, ids, max_new_tokens=32, stop_ids=())
    assert got == expected
