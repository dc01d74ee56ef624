"""Gemma 3 chat: the turn template and a multi-turn session with a KV cache.

Words used in this module:

- message: a dict {"role": ..., "content": ...}. Roles are "system",
  "user" and "assistant" (or its Gemma name "model").
- turn: one message rendered as `<start_of_turn>{role}\\n{content}` followed
  by `<end_of_turn>\\n`. Gemma 3 has no system role: a system message is
  folded into the first user turn, followed by a blank line.
- generation prompt: the opening `<start_of_turn>model\\n` of the turn the
  model is to write. Generation stops at <end_of_turn>, which is not shown.
- images: with a `Sampler` over a `Gemma3Multimodal` model, a user turn may
  carry images; its content holds one `<start_of_image>` marker per image
  (markers are prepended when the text has none), and the messages keep
  the images under an "images" key.

The rendering follows the chat template shipped with the Gemma 3 instruction
tuned checkpoints. `encode_messages` gives its ids with the template's markers
as special ids and message content as plain text, so that "<end_of_turn>"
typed in a message stays text and cannot end the turn. A `ChatSession` keeps
the KV cache between turns, so a new turn prefills only its own tokens, never
the whole history.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from gemma_lab.checks import is_int
from gemma_lab.results import SampleResult
from gemma_lab.sampler import Sampler
from gemma_lab.tokenizer import Tokenizer, check_utf8
from gemma_lab.vision.layout import IMAGE_MARKER

_GEMMA_ROLE = {"user": "user", "assistant": "model", "model": "model"}


def check_messages(messages: Sequence[Mapping[str, str]]) -> list[tuple]:
    """Validates chat messages; returns their (gemma_role, content) turns.

    The rules of `render`: roles "system" (first only, folded into the
    first user turn), "user", "assistant" or "model", alternating from a
    user turn; non-empty string contents (a model reply may be empty).

    Raises:
        TypeError: a message is not a dict.
        ValueError: a role or content breaks the rules; the message names
            its index.
    """
    if isinstance(messages, str | bytes | Mapping) or not isinstance(
        messages, Sequence
    ):
        raise TypeError(
            "messages must be a list of {'role', 'content'} dicts, got "
            f"{messages!r}"
        )
    turns, system = [], None
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(
                f"messages[{i}] is {message!r}; expected a dict with 'role' "
                "and 'content'"
            )
        role, content = message.get("role"), message.get("content")
        if role != "system" and role not in _GEMMA_ROLE:
            raise ValueError(
                f"messages[{i}] has role {role!r}; expected 'system', "
                "'user', 'assistant' or 'model'"
            )
        # A reply may be empty (the model can end its turn at once).
        empty_ok = role in ("assistant", "model")
        if not isinstance(content, str) or not (content.strip() or empty_ok):
            raise ValueError(
                f"messages[{i}] ({role}) has content {content!r}; expected "
                "a non-empty str"
            )
        if role == "system":
            if i != 0:
                raise ValueError(
                    f"messages[{i}] is a system message; only messages[0] "
                    "may be one"
                )
            system = content
            continue
        expected = "user" if len(turns) % 2 == 0 else "model"
        if _GEMMA_ROLE[role] != expected:
            raise ValueError(
                f"messages[{i}] has role {role!r}, expected a {expected} "
                "turn: roles must alternate user, assistant, user, ..."
            )
        turns.append((expected, content))
    if system is not None:
        if not turns:
            raise ValueError("a system message needs a user message after it")
        turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
    return turns


def render(
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = True,
    bos: bool = True,
) -> str:
    """Renders messages in the Gemma 3 chat format.

    Args:
        messages: {"role", "content"} dicts; an optional system message
            first, then user and assistant turns alternating, user first.
        add_generation_prompt: end with `<start_of_turn>model\\n`; the last
            message must then be a user message.
        bos: start with "<bos>" (`Tokenizer.encode` reads it as the BOS id).

    Returns:
        The rendered text.

    Raises:
        TypeError: messages that are not a list of dicts, or a flag that
            is not a bool.
        ValueError: unknown role, empty content, roles that do not
            alternate, a misplaced system message, or a generation prompt
            after an assistant message or after no message at all.

    >>> render([{"role": "system", "content": "Be brief."},
    ...         {"role": "user", "content": "Hi"}])
    '<bos><start_of_turn>user\\nBe brief.\\n\\nHi<end_of_turn>\\n<start_of_turn>model\\n'

    Encoding the rendered text reads special pieces written in message
    content as markers; `encode_messages` keeps content as plain text.
    """  # noqa: E501
    _check_flags(add_generation_prompt=add_generation_prompt, bos=bos)
    turns = _turns(messages, add_generation_prompt)
    text = "<bos>" if bos else ""
    for role, content in turns:
        text += f"<start_of_turn>{role}\n{content}<end_of_turn>\n"
    if add_generation_prompt:
        text += "<start_of_turn>model\n"
    return text


def encode_messages(
    messages: Sequence[Mapping[str, str]],
    tokenizer: Tokenizer,
    *,
    add_generation_prompt: bool = True,
    bos: bool = True,
) -> list[int]:
    """The token ids of `render(messages)`, message content as plain text.

    The template's markers become their ids; content is encoded with
    `special=False`, so a control piece such as "<end_of_turn>" written in a
    message is spelled out as text. Image markers (`<start_of_image>`) in
    content keep their id. For content without control pieces the ids equal
    `tokenizer.encode(render(messages))`.

    Args:
        messages: as for `render`.
        tokenizer: the Gemma 3 `Tokenizer`.
        add_generation_prompt: end with `<start_of_turn>model\n`.
        bos: start with the BOS id.

    Returns:
        The ids, a list of ints.

    Raises:
        TypeError, ValueError: as `render`.
    """
    _check_flags(add_generation_prompt=add_generation_prompt, bos=bos)
    turns = _turns(messages, add_generation_prompt)

    def plain(text: str) -> list[int]:
        return tokenizer.encode(text, add_bos=False, special=False)

    ids = [tokenizer.bos_id] if bos else []
    for role, content in turns:
        ids += [tokenizer.start_of_turn_id, *plain(f"{role}\n{content}")]
        ids += [tokenizer.end_of_turn_id, *plain("\n")]
    if add_generation_prompt:
        ids += [tokenizer.start_of_turn_id, *plain("model\n")]
    return ids


def _check_flags(**flags) -> None:
    """Raises TypeError naming the first flag that is not a bool."""
    for name, flag in flags.items():
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")


def _turns(messages, add_generation_prompt: bool) -> list[tuple]:
    """Checked (gemma_role, content) turns, ready for a generation prompt."""
    turns = check_messages(messages)
    if add_generation_prompt and not turns:
        raise ValueError(
            "add_generation_prompt needs the last message to be a user "
            "message, got no user or assistant message"
        )
    if add_generation_prompt and turns[-1][0] != "user":
        raise ValueError(
            "add_generation_prompt needs the last message to be a user "
            f"message, got a {turns[-1][0]} turn"
        )
    return turns


class ConversationFull(ValueError):
    """A turn that would take a conversation past its `max_len`.

    Attributes:
        need: the tokens the conversation would hold after the turn.
        max_len: the session's limit.
    """

    def __init__(self, need: int, max_len: int):
        super().__init__(
            f"the conversation would reach {need} tokens, over max_len "
            f"{max_len}; call reset() or rewind(), or build the session "
            "with a larger max_len"
        )
        self.need, self.max_len = need, max_len


class ChatSession:
    """A multi-turn conversation that keeps its KV cache between turns.

    Each `send` prefills only the new user turn (plus the closing marker of
    the previous reply) into the cache, then generates the reply. `rewind`
    and `reset` drop turns; the next `send` then prefills the kept history
    once.

    Args:
        sampler: a `Sampler` built with a tokenizer.
        system: an optional system message, folded into the first turn.
        max_len: the most tokens the conversation may hold (cache length).
        max_new_tokens: the default reply length limit.
        **sampling: default sampling settings of `Sampler.generate`
            (temperature, top_k, top_p, seed, stop_ids, stop_strings).

    Raises:
        ValueError: a sampler without a tokenizer, a blank or non-UTF-8
            system message, max_len outside the model's context,
            max_new_tokens that leave no room in max_len, default settings
            that `Sampler.check_options` rejects, or return_logprobs /
            return_logits (a session returns texts only).
        TypeError: a sampler that is not a `Sampler`, or a default setting
            `Sampler.check_options` does not take.

    >>> chat = ChatSession(Sampler(model, tokenizer))  # doctest: +SKIP
    >>> chat.send("Name a colour.")  # doctest: +SKIP
    """

    def __init__(
        self,
        sampler: Sampler,
        *,
        system: str | None = None,
        max_len: int = 2048,
        max_new_tokens: int = 256,
        **sampling,
    ):
        if not isinstance(sampler, Sampler):
            raise TypeError(
                f"sampler must be a gemma_lab Sampler, got {sampler!r}"
            )
        if sampler.tokenizer is None:
            raise ValueError("ChatSession needs a Sampler with a tokenizer")
        if system is not None and (
            not isinstance(system, str) or not system.strip()
        ):
            raise ValueError(
                f"system must be None or a non-blank str, got {system!r}"
            )
        if system is not None:
            check_utf8(system)
        context = sampler.model.config.max_seq_len
        if not is_int(max_len) or not 1 <= max_len <= context:
            raise ValueError(
                f"max_len must lie in [1, {context}] (the model's context), "
                f"got {max_len!r}"
            )
        sampler.check_options(max_new_tokens=max_new_tokens, **sampling)
        _check_unused(sampling)
        max_len = int(max_len)
        if max_new_tokens >= max_len:
            raise ValueError(
                f"max_new_tokens must be < max_len {max_len} (a reply must "
                f"leave room for its prompt), got {max_new_tokens}"
            )
        self.sampler, self.system, self.max_len = sampler, system, max_len
        self.max_new_tokens, self.sampling = max_new_tokens, sampling
        self.reset()

    @property
    def messages(self) -> list[dict[str, str]]:
        """The conversation so far, system message first when given."""
        head = [{"role": "system", "content": self.system}]
        return (head if self.system else []) + [dict(m) for m in self._turns]

    @property
    def token_ids(self) -> list[int]:
        """The ids of the conversation so far (cached and pending).

        Image blocks appear expanded, with 0 at their soft positions.
        """
        return self._fed + self._pending

    def reset(self) -> None:
        """Forgets every turn (the system message stays)."""
        self._turns: list[dict[str, str]] = []
        self._forget_cache()

    def rewind(self, turns: int = 1) -> None:
        """Drops the last `turns` exchanges (user message and reply)."""
        exchanges = len(self._turns) // 2
        if not is_int(turns) or not 0 <= turns <= exchanges:
            raise ValueError(
                f"turns must lie in [0, {exchanges}] (the exchanges so far), "
                f"got {turns!r}"
            )
        del self._turns[len(self._turns) - 2 * int(turns) :]
        self._forget_cache()

    def send(
        self, text: str, images: Sequence | None = None, **overrides
    ) -> str:
        """Adds a user message and returns the model's reply.

        Args:
            text: the user message.
            images: images of this message (needs a sampler over a
                `Gemma3Multimodal` model); `text` holds one
                `<start_of_image>` marker per image, or none, in which case
                the markers are put before the text.
            **overrides: settings of `Sampler.generate` for this turn only.

        Returns:
            The reply, without <end_of_turn>.
        """
        user = _user_message(text, images)
        new_ids, kwargs = self._prepare(user, overrides)
        result = self.sampler.generate(new_ids, **kwargs)
        return self._finish(user, new_ids, result)

    def stream(
        self, text: str, images: Sequence | None = None, **overrides
    ) -> Iterator[str]:
        """Like `send`, yielding the reply's text as tokens arrive.

        The turn is recorded once the iteration is over.
        """
        user = _user_message(text, images)
        new_ids, kwargs = self._prepare(user, overrides)
        pieces = self.sampler.stream(new_ids, **kwargs)
        yield from pieces
        self._finish(user, new_ids, pieces.result)

    # Internals.

    def _forget_cache(self) -> None:
        self._cache, self._fed, self._pending = None, [], []

    def _prepare(self, user: dict, overrides: dict) -> tuple[list[int], dict]:
        """The ids to prefill for a new user turn, and generate's kwargs."""
        messages = self.messages + [user]
        tokenizer = self.sampler.tokenizer
        _turns(messages, True)  # Validates roles and content first.
        if self._cache is None:
            new_ids, fed = encode_messages(messages, tokenizer), messages
        else:
            newline = tokenizer.encode("\n", add_bos=False, special=False)
            turn = encode_messages([user], tokenizer, bos=False)
            new_ids, fed = self._pending + newline + turn, [user]
        kwargs = {"max_new_tokens": self.max_new_tokens, **self.sampling}
        _check_unused(overrides)
        kwargs.update(overrides)
        images = [x for m in fed for x in m.get("images", ())]
        if images:
            kwargs["images"] = images

        expanded = self.sampler.expand_prompt(new_ids)
        need = len(self._fed) + len(expanded) + kwargs["max_new_tokens"]
        if need > self.max_len:
            raise ConversationFull(need, self.max_len)
        # The session's own state changes only once a turn has finished
        # (`_finish`): a turn that fails or is abandoned leaves it as it was.
        cache = self._cache
        if cache is None:
            cache = self.sampler.init_cache(1, self.max_len)
        kwargs.update(cache=cache, start=len(self._fed))
        return new_ids, kwargs

    def _finish(self, user: dict, new_ids, result: SampleResult) -> str:
        """Records a finished turn and the cache state after it."""
        reply_ids = result.tokens[0]
        new_ids = self.sampler.expand_prompt(new_ids)
        fed = result.lengths[0] - len(self._fed) - len(new_ids)
        self._fed = self._fed + new_ids + reply_ids[:fed]
        end_of_turn = self.sampler.tokenizer.end_of_turn_id
        self._pending = reply_ids[fed:] + [end_of_turn]
        self._cache = result.cache

        reply = result.text
        self._turns.append(user)
        self._turns.append({"role": "assistant", "content": reply})
        if result.finish_reasons[0] == "stop_string":
            # The cache holds the stop string and the rest of its last
            # token; the next turn prefills the recorded history instead.
            self._forget_cache()
        return reply


def _check_unused(settings: dict) -> None:
    """Rejects settings whose output a session returns no way to read."""
    for name in ("return_logprobs", "return_logits"):
        if settings.get(name):
            raise ValueError(
                f"{name}=True has no use in a ChatSession, which returns "
                "reply texts only; call Sampler.generate for them"
            )


def _user_message(text: str, images: Sequence | None) -> dict:
    """A user message; image markers are put before a text without any."""
    if not images:
        return {"role": "user", "content": text}
    if isinstance(text, str) and IMAGE_MARKER not in text:
        text = IMAGE_MARKER * len(images) + text
    return {"role": "user", "content": text, "images": list(images)}
