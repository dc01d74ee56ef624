"""What a generation returns, and its text as it grows.

- `SampleResult`: the tokens, texts, finish reasons and cache of a call to
  `Sampler.generate`, one entry per prompt (row).
- `Run`: the mutable state of a generation while its decode steps run.
- `TextStream`: text pieces of one row as tokens arrive. A piece is yielded
  only once later tokens cannot change it: the bytes of a character split
  over tokens are held back, and so is a tail that may start a stop string.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from gemma_lab.model import Cache


@dataclasses.dataclass(frozen=True)
class SampleResult:
    """What `Sampler.generate` returns; one entry per prompt (row).

    Attributes:
        tokens: the generated ids of each row, without the stop id.
        texts: the decoded text of each row, cut before a stop string; None
            when the sampler has no tokenizer.
        finish_reasons: "stop_id", "stop_string" or "length" per row.
        stop_tokens: the stop id that ended each row, or None.
        logprobs: per-token log-probabilities of `tokens` under the model
            (before temperature), or None unless requested.
        logits: [B, steps, V] float32 next-token logits of every step (NumPy),
            or None unless requested.
        cache: the KV cache after the call. It holds every prompt token and
            every generated token except the last one sampled.
        lengths: positions held by the cache per row (prompt start + prompt
            + generated tokens fed back).
    """

    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    stop_tokens: list[int | None]
    logprobs: list[list[float]] | None = None
    logits: np.ndarray | None = None
    cache: Cache | None = dataclasses.field(default=None, repr=False)
    lengths: list[int] = dataclasses.field(default_factory=list)

    @property
    def text(self) -> str:
        """The text of a single-row result."""
        if self.texts is None or len(self.texts) != 1:
            raise ValueError("text needs a single row and a tokenizer")
        return self.texts[0]


def stable_text(text: str, stop_strings: Sequence[str] = ()) -> str:
    """The prefix of a growing decoded text that later tokens cannot change.

    Drops trailing U+FFFD (bytes of a character whose remaining bytes are
    still to come, with byte-fallback tokens) and any tail that could be the
    start of a stop string.
    """
    text = text.rstrip("\ufffd")
    hold = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:n]):
                hold = n
                break
    return text[: len(text) - hold]


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str | None:
    """`text` cut before its first stop string, or None if it has none."""
    hits = [text.find(s) for s in stop_strings if s in text]
    return text[: min(hits)] if hits else None


@dataclasses.dataclass
class Run:
    """Mutable state of one generation while its steps are running."""

    tokens: list[list[int]]
    finish: list[str | None]
    cut_texts: list[str | None]
    logprobs: list[list[float]]
    logits: list[np.ndarray]
    lengths: np.ndarray
    stop_tokens: list[int | None]
    cache: Cache | None = None


class TextStream:
    """Iterates over text pieces as tokens arrive (one prompt).

    Joining the pieces gives `result.text`; `result` is set once the
    iteration is over.
    """

    def __init__(self, steps: Iterator[Run], finalize, tokenizer, stops):
        self._steps, self._finalize = steps, finalize
        self._tokenizer, self._stops = tokenizer, tuple(stops)
        self.result: SampleResult | None = None

    def __iter__(self) -> Iterator[str]:
        emitted = ""
        for run in self._steps:
            if run.cut_texts[0] is not None:
                continue
            text = self._tokenizer.decode(run.tokens[0])
            stable = stable_text(text, self._stops)
            if len(stable) > len(emitted) and stable.startswith(emitted):
                yield stable[len(emitted) :]
                emitted = stable
        self.result = self._finalize()
        final = self.result.text
        if len(final) > len(emitted):
            yield final[len(emitted) :]
