"""The `gemma-lab` command: a thin layer over the package's entry points.

    gemma-lab generate --max-new-tokens 32 "The capital of France is"

Loads the embedded Gemma 3 270M unless `--checkpoint` names a .gguf file or a
Hugging Face safetensors folder.
"""

from __future__ import annotations

import argparse
import sys

from gemma_lab.loading import load
from gemma_lab.sampler import greedy


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-lab", description="Run Gemma 3 offline with gemma_lab."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="continue a prompt")
    gen.add_argument("prompt", help="text to continue")
    gen.add_argument(
        "--max-new-tokens", type=int, default=64, help="default: 64"
    )
    gen.add_argument(
        "--checkpoint",
        default=None,
        help=".gguf file or safetensors folder (default: embedded 270M)",
    )
    return parser


def _generate(args) -> int:
    if args.max_new_tokens < 1:
        print(
            f"--max-new-tokens must be >= 1, got {args.max_new_tokens}",
            file=sys.stderr,
        )
        return 2
    model, tokenizer = load(args.checkpoint)
    prompt = tokenizer.encode(args.prompt)
    ids = greedy(model, prompt, max_new_tokens=args.max_new_tokens)
    ids = [i for i in ids if i not in (tokenizer.eos_id, 106)]
    print(tokenizer.decode(ids))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `gemma-lab` command; returns the exit status."""
    args = _parser().parse_args(argv)
    if args.command == "generate":
        return _generate(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
