"""Can LoRA adapters on the 270M learn the yes/no comparison from text alone?

A probe for the VQA training (see `train_vqa_projector.py`). It takes
easy-vqa's yes/no training questions, leaves the image out and puts the
rationale into the prompt instead ("is there a blue shape? ... model" turn
opened with "a red shape:"); the target is " no" or " yes". The questions
come with their twins (`data_vqa.presence_twins`), so half the targets are
"yes" and the wording alone predicts nothing. Rank-8 adapters on the
attention projections, fresh or read from --adapter, are trained with
`gemma_lab.training` and scored on held-out twins:

    python scripts/probe_text_comparison.py
    python scripts/probe_text_comparison.py --adapter ADAPTER.safetensors

Chance is 0.5. Not part of CI: about four minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import pathlib

import numpy as np

import gemma_lab
from gemma_lab import data, data_vqa, lora, training, vqa
from gemma_lab.data import Example

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", type=pathlib.Path, default=None)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train", type=int, default=4000)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.steps, args.train, args.held_out) < 1:
        parser.error("--steps, --train and --held-out must be >= 1")
    if not args.learning_rate > 0:
        parser.error(f"--learning-rate must be > 0, got {args.learning_rate}")
    if args.adapter is not None and not args.adapter.is_file():
        parser.error(f"--adapter {args.adapter} is not a file")
    return args


def text_examples(seed: int) -> list[Example]:
    """Twinned yes/no questions as text: the rationale ends the prompt."""
    twins = data_vqa.presence_twins(data_vqa.load_split("train"), seed=seed)
    replies = data_vqa.rationale_answers(twins)
    examples = []
    for start in range(0, len(twins), 2):
        pair = replies[start : start + 2]
        if None in pair:
            continue
        for example, reply in zip(twins[start : start + 2], pair, strict=True):
            phrase, _, answer = reply.rpartition(":")
            prompt = vqa.vqa_prompt(example.question).replace(
                "<start_of_image>", ""
            )
            examples.append(
                Example(f"{prompt}{phrase}:", f" {answer.strip()}<end_of_turn>")
            )
    return examples


def main() -> None:
    args = parse_args()
    examples = text_examples(args.seed)
    # Whole twins go to one side, so held-out questions are new pairs.
    pairs = np.random.default_rng(args.seed).permutation(len(examples) // 2)
    order = (pairs[:, None] * 2 + np.arange(2)).ravel()
    train = [examples[i] for i in order[: args.train]]
    held_out = [examples[i] for i in order[-args.held_out :]]

    model, tokenizer = gemma_lab.load(progress=False)
    if args.adapter is None:
        lora.apply_lora(model, rank=8, targets=TARGETS)
    else:
        lora.load_adapter(model, args.adapter)
    config = training.TrainConfig(
        steps=args.steps,
        seq_len=48,
        max_targets=2,
        learning_rate=args.learning_rate,
        eval_every=0,
        checkpoint_every=0,
        seed=args.seed,
    )
    history = training.train(
        model, data.encode(tokenizer, train, seq_len=48), config
    )
    result = data.exact_match(lora.merged_model(model), tokenizer, held_out)
    start = "fresh adapters" if args.adapter is None else str(args.adapter)
    print(
        f"{start}: loss {np.mean(history.losses[:10]):.3f} (first 10 steps) "
        f"-> {np.mean(history.losses[-20:]):.3f} (last 20); held-out "
        f"accuracy {result.accuracy:.3f} on {len(held_out)} questions"
    )


if __name__ == "__main__":
    main()
