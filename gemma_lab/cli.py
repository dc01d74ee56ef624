"""The `gemma-lab` command: a thin layer over the package's entry points.

    gemma-lab generate --max-new-tokens 32 "The capital of France is"
    gemma-lab generate --temperature 0.8 --top-p 0.9 --seed 1 "Once upon"
    gemma-lab generate --max-len 4096 --truncate "$(cat long.txt)"
    gemma-lab chat --system "Be brief."

`generate` decodes greedily unless `--temperature` is above 0 and prints the
continuation as it arrives. The prompt and the new tokens must fit
`--max-len` (default 2048, or the model's context if smaller); a longer
prompt is an error unless `--truncate` drops its oldest tokens after BOS.

`chat` is an interactive conversation: type a message, `/reset` to start
over, `/exit` (or end of input) to leave; a message that would take the
conversation past `--max-len` is refused on stderr and the session goes on.
Both load the embedded Gemma 3
270M unless `--checkpoint` names a .gguf file or a Hugging Face safetensors
folder, and both work offline.
"""

from __future__ import annotations

import argparse
import math
import sys

from gemma_lab.chat import ChatSession, ConversationFull
from gemma_lab.config import GEMMA3_270M, PRESETS
from gemma_lab.loading import load
from gemma_lab.sampler import SEED_LIMIT, Sampler
from gemma_lab.tokenizer import check_utf8

DEFAULT_MAX_LEN = 2048
"""The default cache length of both commands (prompt + new tokens)."""


def _add_sampling_options(parser: argparse.ArgumentParser, new: int) -> None:
    parser.add_argument(
        "--max-new-tokens", type=int, default=new, help=f"default: {new}"
    )
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="0 = greedy (default)"
    )
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0, help="default: 0")
    parser.add_argument(
        "--checkpoint",
        default=None,
        help=".gguf file or safetensors folder (default: embedded 270M)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-lab", description="Run Gemma 3 offline with gemma_lab."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="continue a prompt")
    gen.add_argument("prompt", help="text to continue")
    gen.add_argument(
        "--stop",
        action="append",
        default=[],
        help="stop at this text (repeatable)",
    )
    gen.add_argument(
        "--max-len",
        type=int,
        default=None,
        help=f"prompt + new tokens limit (default: {DEFAULT_MAX_LEN}, or the "
        "model's context if smaller)",
    )
    gen.add_argument(
        "--truncate",
        action="store_true",
        help="drop the prompt's oldest tokens (after BOS) to fit --max-len",
    )
    _add_sampling_options(gen, 64)
    chat = commands.add_parser("chat", help="interactive chat (streaming)")
    chat.add_argument("--system", default=None, help="a system message")
    chat.add_argument(
        "--max-len",
        type=int,
        default=None,
        help=f"conversation length limit (default: {DEFAULT_MAX_LEN}, or the "
        "model's context if smaller)",
    )
    _add_sampling_options(chat, 256)
    return parser


def _sampling(args) -> dict:
    return dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
    )


def _generate(args, out) -> int:
    model, tokenizer = load(args.checkpoint)
    max_len = _fitting_max_len(args, model.config)
    ids = tokenizer.encode(args.prompt)
    room = max_len - args.max_new_tokens
    if len(ids) > room and not args.truncate:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, over the {room} that "
            f"--max-len {max_len} leaves after --max-new-tokens "
            f"{args.max_new_tokens}; raise --max-len or pass --truncate"
        )

    sampler = Sampler(model, tokenizer)
    stream = sampler.stream(
        ids,
        stop_strings=args.stop,
        max_len=max_len,
        truncate=args.truncate,
        **_sampling(args),
    )
    for piece in stream:
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


def _fitting_max_len(args, config) -> int:
    """`--max-len`, or its default, checked against the loaded model."""
    problem = _check_limits(args, config.max_seq_len, config.vocab_size)
    if problem:
        raise ValueError(problem)
    return _max_len(args, config.max_seq_len)


def _max_len(args, context: int) -> int:
    """`--max-len`, or its default: at most DEFAULT_MAX_LEN and `context`."""
    if args.max_len is None:
        return min(DEFAULT_MAX_LEN, context)
    return args.max_len


def _chat(args, out, lines) -> int:
    model, tokenizer = load(args.checkpoint)
    session = ChatSession(
        Sampler(model, tokenizer),
        system=args.system,
        max_len=_fitting_max_len(args, model.config),
        **_sampling(args),
    )
    out.write("Type a message; /reset starts over, /exit leaves.\n")
    for line in lines:
        text = line.strip()
        if text == "/exit":
            break
        if text == "/reset":
            session.reset()
            out.write("(conversation reset)\n")
            continue
        if not text:
            continue
        try:
            for piece in session.stream(text):
                out.write(piece)
                out.flush()
        except ConversationFull as error:
            out.flush()
            print(
                f"gemma-lab: error: the conversation would reach "
                f"{error.need} tokens, over --max-len {error.max_len}; type "
                "/reset to start over, or restart with a larger --max-len",
                file=sys.stderr,
            )
            continue
        except ValueError as error:
            # A message that cannot be sent ends neither the session nor
            # its status: the next line is read as usual.
            out.flush()
            print(f"gemma-lab: error: {error}", file=sys.stderr)
            continue
        out.write("\n")
    return 0


def _typed_lines():
    """Lines typed at a "> " prompt, until end of input."""
    while True:
        try:
            yield input("> ")
        except EOFError:
            return


def main(argv: list[str] | None = None, *, stdin=None, stdout=None) -> int:
    """Entry point of the `gemma-lab` command; returns the exit status.

    Args:
        argv: the arguments (default: the command line).
        stdin: where `chat` reads messages, one per line (default: stdin).
        stdout: where output goes (default: stdout).
    """
    args = _parser().parse_args(argv)
    out = stdout or sys.stdout
    problem = _check_options(args)
    if problem:
        print(f"gemma-lab: error: {problem}", file=sys.stderr)
        return 2
    try:
        if args.command == "generate":
            return _generate(args, out)
        if stdin is None:
            stdin = _typed_lines() if sys.stdin.isatty() else sys.stdin
        return _chat(args, out, stdin)
    except (FileNotFoundError, ValueError) as error:
        # Bad checkpoints and prompts that do not fit are user errors.
        print(f"gemma-lab: error: {error}", file=sys.stderr)
        return 2


def _check_options(args) -> str | None:
    """The first invalid option, described, before any model is loaded."""
    if args.max_new_tokens < 1:
        return f"--max-new-tokens must be >= 1, got {args.max_new_tokens}"
    if not 0 <= args.temperature < math.inf:
        return (
            f"--temperature must be a finite number >= 0, got "
            f"{args.temperature}"
        )
    if args.top_k is not None and args.top_k < 1:
        return f"--top-k must be >= 1, got {args.top_k}"
    if args.top_p is not None and not 0 < args.top_p <= 1:
        return f"--top-p must lie in (0, 1], got {args.top_p}"
    if not 0 <= args.seed < SEED_LIMIT:
        return f"--seed must lie in [0, 2**32), got {args.seed}"
    return _check_texts(args) or _check_max_len(args)


def _check_texts(args) -> str | None:
    """Whether the prompt, `--stop` and `--system` texts can be used."""
    if any(not stop for stop in getattr(args, "stop", ())):
        return "--stop must be a non-empty text, got ''"
    system = getattr(args, "system", None)
    if system is not None and not system.strip():
        return f"--system must be a non-blank text, got {system!r}"
    texts = [("the prompt", getattr(args, "prompt", ""))]
    texts += [("--stop", stop) for stop in getattr(args, "stop", ())]
    texts += [("--system", system or "")]
    for name, text in texts:
        try:
            check_utf8(text)
        except ValueError as error:
            return f"{name}: {error}"
    return None


def _check_max_len(args) -> str | None:
    """`_check_limits` before loading: the embedded model's context and
    vocabulary, or for a --checkpoint the longest context of any preset
    (its own context and vocabulary are checked once it is read)."""
    if args.checkpoint is None:
        config = GEMMA3_270M
        return _check_limits(args, config.max_seq_len, config.vocab_size)
    context = max(c.max_seq_len for c in PRESETS.values())
    return _check_limits(args, context, None)


def _check_limits(args, context: int, vocab_size: int | None) -> str | None:
    """Whether `--top-k` fits the vocabulary (None: unknown yet) and
    `--max-len` the context, with room for a prompt after the new tokens."""
    if vocab_size is not None and (args.top_k or 0) > vocab_size:
        return (
            f"--top-k must be <= the model's vocabulary size {vocab_size}, "
            f"got {args.top_k}"
        )
    if args.max_len is not None and args.max_len > context:
        return (
            f"--max-len must be <= the model's context {context}, got "
            f"{args.max_len}"
        )
    return _check_room(args, _max_len(args, context), args.max_len is None)


def _check_room(args, max_len: int, default: bool) -> str | None:
    """Whether `max_len` (`--max-len` or its default) fits the new tokens."""
    # A kept prompt needs BOS, and a truncated one BOS plus its last token.
    prompt = 2 if getattr(args, "truncate", False) else 1
    least = args.max_new_tokens + prompt
    if max_len >= least:
        return None
    if not default:
        return (
            f"--max-len must be >= --max-new-tokens + {prompt} = {least}, "
            f"got {max_len}"
        )
    return (
        f"--max-new-tokens must be <= --max-len - {prompt} = "
        f"{max_len - prompt} (--max-len defaults to {max_len}), got "
        f"{args.max_new_tokens}; lower --max-new-tokens or raise --max-len"
    )


if __name__ == "__main__":
    sys.exit(main())
