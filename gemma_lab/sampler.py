"""Text generation with the KV cache: prefill, decode steps, sampling.

Words used in this module:

- prefill: one forward pass over the prompt (a chunk of new tokens) that
  fills the KV cache and gives the logits of the next token.
- decode step: one forward pass over a single new token per row, reading and
  writing the cache. Its shapes never change between two crossings of a
  `live_slots` step, so it compiles a few times per cache length at most,
  never per token.
- live slots: while rows are shorter than the cache, prefill and decode
  steps run on rings cut to the slots in use (128, 512, 2048, ... slots,
  grown as rows get longer), so a short generation in a long cache reads no
  empty slots; a result's cache has its full length again.
- bucket: prompt chunks are right-padded to a bucketed length (powers of two
  up to 512, then multiples of 512) and the cache is sized to a bucketed
  length, so prompts of similar lengths share one compiled prefill.
- ragged batch: prompts of different lengths in one call. Each row is
  right-padded with position -1, which the model ignores, and each row's
  positions start at 0; decoding continues every row from its own length.
- stop ids: ids that end a row (by default <eos> 1 and <end_of_turn> 106);
  the stop id is not part of the returned tokens. Stop strings end a row as
  soon as the row's text contains one of them (multi-token strings
  included); the text is cut before it.
- image block: with a `Gemma3Multimodal` model, each image marker
  (`<start_of_image>`) of a prompt expands to "\\n\\n", <start_of_image>,
  M soft positions, <end_of_image>, "\\n\\n" (see
  `gemma_lab.vision.layout`). The whole prompt is one prefill chunk, so
  every image lies within it and keeps its bidirectional attention group;
  decode steps are text-only.

The sampling methods are the pure functions of `gemma_lab.sampling`; the
compiled steps and the cache shapes live in `gemma_lab.decoding`, the result
and the text stream in `gemma_lab.results`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array

from gemma_lab.attention import LayerCache
from gemma_lab.checks import is_int, is_real
from gemma_lab.decoding import (
    bucket_length,
    cache_capacity,
    compiled_steps,
    live_cache,
    live_slots,
)
from gemma_lab.model import Cache, Transformer
from gemma_lab.multimodal import Gemma3Multimodal, prepare_prompt
from gemma_lab.results import Run, SampleResult, TextStream, cut_at_stop
from gemma_lab.sampling import next_tokens
from gemma_lab.tokenizer import Tokenizer
from gemma_lab.vision.layout import expand_images

DEFAULT_STOP_IDS = (1, 106)
"""<eos> and <end_of_turn>."""

# The sampler.


@dataclasses.dataclass(frozen=True)
class _Options:
    """Validated settings of one generation."""

    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    seed: int
    stop_ids: tuple[int, ...]
    stop_strings: tuple[str, ...]
    return_logprobs: bool
    return_logits: bool


SEED_LIMIT = 2**32
"""Seeds lie in [0, SEED_LIMIT): `jax.random.key` keeps 32 bits of a seed."""


def _is_ids(prompt) -> bool:
    """Whether `prompt` is one prompt of ids (not a text or a batch)."""
    if isinstance(prompt, np.ndarray | jax.Array):
        return prompt.ndim == 1
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, str)
        and len(prompt) > 0
        and isinstance(prompt[0], numbers.Number | np.generic)
    )


def _id_row(prompt, name: str) -> list[int]:
    """A prompt of ids as a list of ints; TypeError names a bad element."""
    if isinstance(prompt, np.ndarray | jax.Array):
        prompt = np.asarray(prompt).tolist() if prompt.ndim == 1 else None
    if not isinstance(prompt, Sequence) or isinstance(prompt, str | bytes):
        raise TypeError(
            f"{name} must be a str or a sequence of int ids, got {prompt!r}"
        )
    for j, t in enumerate(prompt):
        if not is_int(t):
            raise TypeError(
                f"{name} holds {t!r} at index {j}; expected int token ids"
            )
    return [int(t) for t in prompt]


def _options(
    tokenizer: Tokenizer | None, vocab_size: int, max_new_tokens,
    temperature, top_k, top_p, seed, stop_ids, stop_strings,
    return_logprobs, return_logits,
) -> _Options:  # fmt: skip
    """Checked settings of one generation; ValueError names the argument."""
    if not is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(
            f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}"
        )
    if not is_real(temperature) or not 0 <= temperature < math.inf:
        raise ValueError(
            f"temperature must be a finite number >= 0, got {temperature!r}"
        )
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_k is not None and top_k > vocab_size:
        raise ValueError(
            f"top_k must be <= the vocabulary size {vocab_size}, got {top_k}"
        )
    if top_p is not None and (not is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must lie in (0, 1] or be None, got {top_p!r}")
    if not is_int(seed) or not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"seed must be an int in [0, 2**32), got {seed!r}")
    stop_ids = _stop_ids(stop_ids, vocab_size)
    stop_strings = _stop_strings(stop_strings, tokenizer)
    for name, flag in [
        ("return_logprobs", return_logprobs),
        ("return_logits", return_logits),
    ]:
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool, got {flag!r}")
    return _Options(
        int(max_new_tokens), float(temperature),
        None if top_k is None else int(top_k),
        None if top_p is None else float(top_p), int(seed), stop_ids,
        stop_strings, return_logprobs, return_logits,
    )  # fmt: skip


def _stop_ids(stop_ids, vocab_size: int) -> tuple[int, ...]:
    """`stop_ids` as a tuple, checked to be a sequence of token ids."""
    ok = isinstance(stop_ids, Sequence | np.ndarray) and not isinstance(
        stop_ids, str | bytes
    )
    if not ok or not all(is_int(i) and 0 <= i < vocab_size for i in stop_ids):
        raise ValueError(
            f"stop_ids must be a sequence of token ids in [0, {vocab_size}), "
            f"got {stop_ids!r}"
        )
    return tuple(int(i) for i in stop_ids)


def _stop_strings(stop_strings, tokenizer) -> tuple[str, ...]:
    """`stop_strings` (one text or a sequence) as a tuple of texts."""
    if isinstance(stop_strings, str):
        stop_strings = (stop_strings,)
    texts = tuple(stop_strings) if isinstance(stop_strings, Sequence) else ()
    if not isinstance(stop_strings, Sequence) or not all(
        isinstance(s, str) and s for s in texts
    ):
        raise ValueError(
            f"stop_strings must be non-empty texts, got {stop_strings!r}"
        )
    if texts and tokenizer is None:
        raise ValueError("stop_strings need a Sampler built with a tokenizer")
    return texts


class Sampler:
    """Generates text from a model with a KV cache and jit-compiled steps.

    The weights are read once, when the sampler is built: build a new one
    after changing the model's parameters. Compiled functions are kept per
    sampler, so reuse one sampler for many calls.

    Args:
        model: the language model, or a `Gemma3Multimodal` whose prompts may
            carry images (`generate(..., images=...)`).
        tokenizer: needed for text prompts, texts in results, stop strings
            and streaming; optional for id-only use.

    Attributes:
        model: the language model (`Transformer`).
        multimodal: the `Gemma3Multimodal` model, or None.

    >>> sampler = Sampler(model, tokenizer)  # doctest: +SKIP
    >>> sampler.generate("The sky is", max_new_tokens=8).text  # doctest: +SKIP
    """

    def __init__(
        self,
        model: Transformer | Gemma3Multimodal,
        tokenizer: Tokenizer | None = None,
    ):
        if not isinstance(model, Transformer | Gemma3Multimodal):
            raise TypeError(
                "model must be a gemma_lab Transformer or Gemma3Multimodal, "
                f"got {model!r}"
            )
        if tokenizer is not None and not (
            hasattr(tokenizer, "encode") and hasattr(tokenizer, "decode")
        ):
            raise TypeError(
                f"tokenizer must be a gemma_lab Tokenizer or None, got "
                f"{tokenizer!r}"
            )
        self.multimodal = None
        if isinstance(model, Gemma3Multimodal):
            self.multimodal, model = model, model.language_model
        self.model, self.tokenizer = model, tokenizer
        graphdef, state = nnx.split(model)
        self._leaves, treedef = jax.tree.flatten(state)
        steps = compiled_steps(graphdef, treedef)
        self._prefill, self._prefill_images, self._decode = steps

    def init_cache(self, batch: int, max_len: int) -> Cache:
        """An empty cache for `batch` rows of up to `max_len` positions."""
        return self.model.init_cache(batch, max_len)

    def generate(
        self,
        prompts: str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop_ids: Sequence[int] = DEFAULT_STOP_IDS,
        stop_strings: Sequence[str] = (),
        return_logprobs: bool = False,
        return_logits: bool = False,
        max_len: int | None = None,
        truncate: bool = False,
        cache: Cache | None = None,
        start: int | Sequence[int] = 0,
        images: Sequence | None = None,
        features: Array | None = None,
    ) -> SampleResult:
        """Continues one prompt or a batch of prompts of any lengths.

        Args:
            prompts: a text, a list of texts, a list of ids, or a list of id
                lists. Texts are encoded with BOS, so an empty text samples
                from BOS alone (unconditionally).
            max_new_tokens: the most tokens generated per row (>= 1).
            temperature: 0 for greedy decoding, else the sampling
                temperature.
            top_k: sample among the k most likely tokens only.
            top_p: sample from the nucleus of probability mass p.
            seed: the random seed; the same seed gives the same sample.
            stop_ids: ids that end a row (not included in its tokens).
            stop_strings: texts that end a row (cut from its text).
            return_logprobs: include per-token log-probabilities.
            return_logits: include the logits of every step [B, steps, V].
            max_len: the cache length (prompt + new tokens per row). Default:
                a bucket of the longest row's need, at most the model's
                context `config.max_seq_len`.
            truncate: when a row does not fit `max_len` (or the context),
                drop its oldest tokens after BOS instead of raising.
            cache: continue rows already held by this cache (from an earlier
                result's `.cache`); the prompts are then the new tokens only.
            start: with `cache`, the position of each row's first new token
                (the earlier result's `.lengths`).
            images: with a `Gemma3Multimodal` model, one image (PIL or
                NumPy, any size) per image marker, in reading order over all
                prompts (row 0's images first). Each marker expands to an
                image block; `lengths` count the expanded tokens.
            features: instead of `images`, vision features [I, P, E].

        Returns:
            A `SampleResult`.

        Raises:
            ValueError: on invalid settings, a prompt of no ids, a count of
                image markers that differs from the images given, or a row
                that does not fit the cache or context (unless `truncate`),
                before any computation.
            TypeError: a prompt that is not a text or int ids, or a
                `start`, `truncate` or `cache` of the wrong type.
        """
        opts = self.check_options(
            max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids,
            stop_strings=stop_strings, return_logprobs=return_logprobs,
            return_logits=return_logits,
        )  # fmt: skip
        run, steps = self._start(
            prompts, opts, max_len, truncate, cache, start, images, features
        )
        for _ in steps:
            pass
        return self._result(run, opts)

    def stream(
        self,
        prompt: str | Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop_ids: Sequence[int] = DEFAULT_STOP_IDS,
        stop_strings: Sequence[str] = (),
        return_logprobs: bool = False,
        return_logits: bool = False,
        max_len: int | None = None,
        truncate: bool = False,
        cache: Cache | None = None,
        start: int | Sequence[int] = 0,
        images: Sequence | None = None,
        features: Array | None = None,
    ) -> TextStream:
        """Like `generate` for one prompt, yielding text as tokens arrive.

        Takes the keyword arguments of `generate`, with the same defaults.
        Text is only yielded once it can no longer change: a character split
        over byte-fallback tokens appears when its last byte arrives, and
        text that may begin a stop string waits until it is clear. After the
        iteration, `.result` holds the `SampleResult` (same tokens as
        `generate`).

        Raises:
            ValueError, TypeError: as `generate`, when the iterator is made.

        >>> pieces = sampler.stream("Once", max_new_tokens=8)  # doctest: +SKIP
        >>> print("".join(pieces))  # doctest: +SKIP
        """
        if self.tokenizer is None:
            raise ValueError("stream needs a Sampler built with a tokenizer")
        if not isinstance(prompt, str) and not _is_ids(prompt):
            raise ValueError(
                "stream takes one prompt: a text or a list of ids, got "
                f"{prompt!r}"
            )
        opts = self.check_options(
            max_new_tokens=max_new_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=seed, stop_ids=stop_ids,
            stop_strings=stop_strings, return_logprobs=return_logprobs,
            return_logits=return_logits,
        )  # fmt: skip
        run, steps = self._start(
            prompt, opts, max_len, truncate, cache, start, images, features
        )
        return TextStream(
            steps, lambda: self._result(run, opts), self.tokenizer,
            opts.stop_strings,
        )  # fmt: skip

    def check_options(
        self,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int = 0,
        stop_ids: Sequence[int] = DEFAULT_STOP_IDS,
        stop_strings: Sequence[str] = (),
        return_logprobs: bool = False,
        return_logits: bool = False,
    ) -> _Options:
        """Checks the sampling settings of `generate` without running it.

        Takes the settings of `generate` that do not depend on the prompts,
        so a caller can reject bad defaults before any work.

        Returns:
            The checked settings.

        Raises:
            ValueError: a setting of the wrong type or out of range; the
                message names it. Bools are not accepted as ints.
        """
        return _options(
            self.tokenizer, self.model.config.vocab_size, max_new_tokens,
            temperature, top_k, top_p, seed, stop_ids, stop_strings,
            return_logprobs, return_logits,
        )  # fmt: skip

    # Preparing a call.

    def _rows(self, prompts) -> list[list[int]]:
        """Prompts as lists of ids, one per row."""
        single = isinstance(prompts, str) or _is_ids(prompts)
        if single:
            prompts = [prompts]
        elif isinstance(prompts, np.ndarray | jax.Array) and prompts.ndim == 2:
            prompts = list(prompts)
        elif not isinstance(prompts, Sequence):
            raise TypeError(
                "prompts must be a str, a sequence of int ids, or a list of "
                f"those, got {prompts!r}"
            )
        rows = []
        for i, prompt in enumerate(prompts):
            name = "the prompt" if single else f"prompts[{i}]"
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("text prompts need a tokenizer")
                prompt = self.tokenizer.encode(prompt)
            row = _id_row(prompt, name)
            if len(row) == 0:
                raise ValueError(f"prompt {i} is empty; expected >= 1 token")
            vocab = self.model.config.vocab_size
            if min(row) < 0 or max(row) >= vocab:
                raise ValueError(
                    f"prompt {i} holds token ids outside [0, {vocab}): "
                    f"min {min(row)}, max {max(row)}"
                )
            rows.append(row)
        if not rows:
            raise ValueError("prompts is empty; expected at least one prompt")
        return rows

    def _fit(self, rows, starts, opts, max_len, truncate, cache):
        """Checks (or truncates) rows against the cache; returns max_len."""
        context = self.model.config.max_seq_len
        if max_len is not None and (not is_int(max_len) or max_len < 1):
            raise ValueError(
                f"max_len must be an int >= 1 or None, got {max_len!r}"
            )
        if cache is not None:
            max_len = cache_capacity(cache)
        elif max_len is None:
            need = max(len(r) for r in rows) + opts.max_new_tokens
            max_len = min(bucket_length(min(need, context)), context)
        elif max_len > context:
            raise ValueError(
                f"max_len must be <= the model's context {context}, "
                f"got {max_len}"
            )
        for i, row in enumerate(rows):
            room = max_len - starts[i] - opts.max_new_tokens
            if len(row) <= room:
                continue
            if not truncate or room < 2:
                raise ValueError(
                    f"prompt {i} ({len(row)} tokens) + max_new_tokens "
                    f"({opts.max_new_tokens}) from position {starts[i]} "
                    f"exceeds the cache length {max_len}; shorten the "
                    "prompt, raise max_len, or pass truncate=True"
                )
            rows[i] = row[:1] + row[len(row) - room + 1 :]
        return max_len

    def expand_prompt(self, ids: Sequence[int]) -> list[int]:
        """The ids a prompt occupies in the cache.

        With a `Gemma3Multimodal` model each image marker expands to its
        image block (0 at soft positions); otherwise `ids` unchanged.
        """
        if self.multimodal is None:
            return [int(i) for i in ids]
        mm = self.multimodal
        return expand_images(
            ids, tokens_per_image=mm.tokens_per_image,
            start_id=mm.image_ids.start, end_id=mm.image_ids.end, soft_id=0,
        ).ids.tolist()  # fmt: skip

    def _with_images(self, rows, images, features, truncate):
        """Expanded rows, and a function laying out the prefill, or None."""
        given = images is not None or features is not None
        if self.multimodal is None:
            if given:
                raise ValueError(
                    "images= and features= need a Sampler built over a "
                    "gemma_lab.multimodal.Gemma3Multimodal model"
                )
            return rows, None
        if images is not None and features is not None:
            raise ValueError("pass images= or features=, not both")
        count = (
            0 if not given else len(images if features is None else features)
        )
        marker = self.multimodal.image_ids.start
        markers = sum(row.count(marker) for row in rows)
        if markers != count:
            raise ValueError(
                f"the prompts hold {markers} image markers ({marker}, "
                f"'<start_of_image>') but {count} images were given; "
                "expected one marker per image"
            )
        if markers == 0:
            return rows, None
        if truncate:
            raise ValueError(
                "truncate=True cannot shorten prompts with images; shorten "
                "the prompt or raise max_len"
            )
        layout = functools.partial(
            prepare_prompt, self.multimodal, rows, images, features=features
        )
        return [self.expand_prompt(row) for row in rows], layout

    def _start(self, prompts, opts, max_len=None, truncate=False,
               cache=None, start=0, images=None, features=None):  # fmt: skip
        """Validates a call, then returns its run state and step iterator."""
        rows = self._rows(prompts)
        rows, layout = self._with_images(rows, images, features, truncate)
        if not isinstance(truncate, bool):
            raise TypeError(f"truncate must be a bool, got {truncate!r}")
        if cache is not None and not (
            isinstance(cache, tuple)
            and all(isinstance(c, LayerCache) for c in cache)
        ):
            raise TypeError(
                "cache must be a Cache (a result's .cache, or "
                f"Sampler.init_cache) or None, got {type(cache).__name__}"
            )
        if is_int(start):
            starts = [int(start)] * len(rows)
        elif isinstance(start, Sequence | np.ndarray) and all(
            is_int(s) for s in start
        ):
            starts = [int(s) for s in start]
        else:
            raise TypeError(
                f"start must be an int >= 0 or one int per prompt, got "
                f"{start!r}"
            )
        if len(starts) != len(rows) or min(starts) < 0:
            raise ValueError(
                f"start must be an int >= 0 or one per prompt ({len(rows)}), "
                f"got {start!r}"
            )
        if cache is not None and cache[0].positions.shape[0] != len(rows):
            raise ValueError(
                f"cache holds {cache[0].positions.shape[0]} rows, "
                f"got {len(rows)} prompts"
            )
        max_len = self._fit(rows, starts, opts, max_len, truncate, cache)
        if cache is None:
            cache = self.init_cache(len(rows), max_len)
        run = Run(
            tokens=[[] for _ in rows],
            finish=[None] * len(rows),
            cut_texts=[None] * len(rows),
            logprobs=[[] for _ in rows],
            logits=[],
            lengths=np.asarray(starts) + [len(r) for r in rows],
            stop_tokens=[None] * len(rows),
        )
        return run, self._steps(run, rows, starts, cache, opts, layout)

    # Running a call.

    def _steps(self, run, rows, starts, cache, opts, layout=None):
        """Prefills, then samples and decodes until every row is done."""
        # Attention reads only the ring slots in use: the rings shrink to a
        # `live_slots` size covering every position held or written, grow
        # as rows get longer, and are returned at their full sizes.
        sizes = [layer.positions.shape[1] for layer in cache]
        held = int(jnp.max(jnp.stack([jnp.max(c.positions) for c in cache])))
        live = live_slots(max(max(run.lengths), held + 1), max(sizes))
        cache = live_cache(cache, live, sizes)
        logits, cache = self._prefill_rows(rows, starts, cache, layout)
        key = jax.random.key(opts.seed)
        flags = dict(
            greedy=opts.temperature == 0,
            top_k=opts.top_k,
            use_top_p=opts.top_p is not None,
            with_logprobs=opts.return_logprobs,
        )
        sampling = (
            key,
            jnp.float32(max(opts.temperature, 1e-6)),
            jnp.float32(opts.top_p or 1.0),
        )
        new, logprobs = next_tokens(
            logits, sampling[0], 0, *sampling[1:], **flags
        )
        for step in range(opts.max_new_tokens):
            if opts.return_logits:
                run.logits.append(np.asarray(logits, np.float32))
            self._record(run, np.asarray(new), np.asarray(logprobs), opts)
            yield run
            done = all(f is not None for f in run.finish)
            if done or step == opts.max_new_tokens - 1:
                break
            # The new tokens go to positions run.lengths.
            if max(run.lengths) >= live:
                live = live_slots(max(run.lengths) + 1, max(sizes))
                cache = live_cache(cache, live, sizes)
            new, logprobs, logits, cache = self._decode(
                self._leaves, new, jnp.asarray(run.lengths, jnp.int32), cache,
                sampling[0], step + 1, *sampling[1:],
                with_logits=opts.return_logits, **flags,
            )  # fmt: skip
            run.lengths = run.lengths + 1
        for i, reason in enumerate(run.finish):
            run.finish[i] = reason or "length"
        run.cache = live_cache(cache, max(sizes), sizes)
        yield run

    def _prefill_rows(self, rows, starts, cache, layout):
        """One prefill pass over the rows: next-token logits and the cache.

        `layout`, when given, lays out rows with images (soft tokens and
        attention groups) at the same bucketed length as text rows.
        """
        tokens, positions, last = _pack(rows, starts)
        if layout is None:
            return self._prefill(self._leaves, tokens, positions, cache, last)
        prompt = layout(length=tokens.shape[1])
        offset = jnp.asarray(starts, jnp.int32)[:, None]
        shifted = jnp.where(
            prompt.positions >= 0, prompt.positions + offset, -1
        )
        prompt = dataclasses.replace(prompt, positions=shifted)
        return self._prefill_images(self._leaves, prompt, cache, last)

    def _record(self, run, new, logprobs, opts) -> None:
        """Appends one step's tokens to the rows still running."""
        for i, token in enumerate(new.tolist()):
            if run.finish[i] is not None:
                continue
            if token in opts.stop_ids:
                run.finish[i], run.stop_tokens[i] = "stop_id", token
                continue
            run.tokens[i].append(token)
            run.logprobs[i].append(float(logprobs[i]))
            if opts.stop_strings:
                text = self.tokenizer.decode(run.tokens[i])
                cut = cut_at_stop(text, opts.stop_strings)
                if cut is not None:
                    run.finish[i], run.cut_texts[i] = "stop_string", cut

    def _result(self, run: Run, opts: _Options) -> SampleResult:
        """Freezes a finished run into a `SampleResult`."""
        texts = None
        if self.tokenizer is not None:
            texts = [
                cut if cut is not None else self.tokenizer.decode(tokens)
                for tokens, cut in zip(run.tokens, run.cut_texts, strict=True)
            ]
        logits = None
        if opts.return_logits:
            logits = np.stack(run.logits, axis=1)
        return SampleResult(
            tokens=run.tokens,
            texts=texts,
            finish_reasons=list(run.finish),
            stop_tokens=list(run.stop_tokens),
            logprobs=run.logprobs if opts.return_logprobs else None,
            logits=logits,
            cache=run.cache,
            lengths=[int(n) for n in run.lengths],
        )


def _pack(rows, starts):
    """Right-pads rows to a bucket: tokens, positions (-1 pads), last index."""
    width = bucket_length(max(len(r) for r in rows))
    tokens = np.zeros((len(rows), width), np.int32)
    positions = np.full((len(rows), width), -1, np.int32)
    for i, (row, start) in enumerate(zip(rows, starts, strict=True)):
        tokens[i, : len(row)] = row
        positions[i, : len(row)] = np.arange(start, start + len(row))
    last = np.asarray([len(r) - 1 for r in rows], np.int32)
    return tokens, positions, last


def greedy(
    model: Transformer,
    prompt: list[int],
    *,
    max_new_tokens: int,
    stop_ids: tuple[int, ...] = DEFAULT_STOP_IDS,
) -> list[int]:
    """Greedy continuation of one prompt, the stop id kept at the end.

    A convenience over `Sampler` that compiles afresh on every call; build a
    `Sampler` once for repeated use.

    Args:
        model: the language model.
        prompt: token ids, BOS included; at least one.
        max_new_tokens: upper bound on generated tokens (0 returns []).
        stop_ids: generation ends after any of these ids (kept in the output).

    Returns:
        The generated ids, without the prompt.

    Raises:
        ValueError: an empty prompt, or settings `Sampler.generate` rejects.
    """
    if len(prompt) == 0:
        raise ValueError("prompt is empty; expected >= 1 token id")
    if max_new_tokens == 0:
        return []
    result = Sampler(model).generate(
        list(prompt), max_new_tokens=max_new_tokens, stop_ids=stop_ids,
        return_logits=False,
    )  # fmt: skip
    ids = result.tokens[0]
    if result.stop_tokens[0] is not None:
        ids.append(result.stop_tokens[0])
    return ids
