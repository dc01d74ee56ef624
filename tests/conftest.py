"""Shared fixtures: the real Gemma 3 270M (gemma_lab and transformers)."""

import os

import pytest

import gemma_lab


@pytest.fixture(scope="session")
def gguf_path():
    return gemma_lab.default_checkpoint()


@pytest.fixture(scope="session")
def real_model(gguf_path):
    """The embedded 270M in float32, with its tokenizer."""
    return gemma_lab.load(gguf_path, progress=False)


@pytest.fixture(scope="session")
def hf_model(gguf_path):
    """transformers' Gemma 3 on the same GGUF file, float32, eval mode."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    folder, name = os.path.split(gguf_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    return model.eval()
