"""gemma_lab: learn, inspect and fine-tune Gemma 3 in JAX, offline.

The few entry points the notebooks use:

>>> import gemma_lab
>>> model, tokenizer = gemma_lab.load()  # doctest: +SKIP
"""

from gemma_lab.capture import Capture, capture
from gemma_lab.chat import ChatSession, encode_messages, render
from gemma_lab.checkpoints.hf_multimodal import load_multimodal
from gemma_lab.checkpoints.rules import CheckpointError
from gemma_lab.config import PRESETS, TransformerConfig, preset
from gemma_lab.loading import default_checkpoint, load
from gemma_lab.model import ModelOutput, Transformer
from gemma_lab.multimodal import Gemma3Multimodal, prepare_prompt
from gemma_lab.results import SampleResult
from gemma_lab.sampler import Sampler
from gemma_lab.tokenizer import Tokenizer

__all__ = [
    "Capture",
    "PRESETS",
    "ChatSession",
    "CheckpointError",
    "Gemma3Multimodal",
    "ModelOutput",
    "SampleResult",
    "Sampler",
    "Tokenizer",
    "Transformer",
    "TransformerConfig",
    "capture",
    "default_checkpoint",
    "encode_messages",
    "load",
    "load_multimodal",
    "prepare_prompt",
    "preset",
    "render",
]
