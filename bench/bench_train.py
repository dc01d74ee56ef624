"""Training throughput: gemma_lab LoRA vs transformers + peft, one run.

Both train rank-8 adapters on the seven projections of the Gemma 3 270M
(same GGUF weights, float32, CPU) on the same BBC News batches, with the
loss on answer tokens only and AdamW. gemma_lab computes output logits only
at the answer positions; transformers computes them everywhere.

    python bench/bench_train.py --steps 5 --batch-size 4 --seq-len 64

Both models are loaded in one process and take their steps in turns, so
that other work on the machine slows both alike. Prints training tokens per
second (batch * seq_len over the median step time) for both.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import gemma_lab
from gemma_lab import data, lora, training

TARGETS = list(lora.TARGETS)


def batches(args, tokenizer):
    train_set, _ = data.bbc_news_topics(num_held_out=10, max_words=20)
    encoded = data.encode(tokenizer, train_set, seq_len=args.seq_len)
    config = training.TrainConfig(
        steps=args.steps + 1,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup_steps=0,
    )
    steps = range(args.steps + 1)
    return config, [training._step_batch(encoded, config, s) for s in steps]


def gemma_lab_step(args, model, config):
    """A function running one LoRA update of gemma_lab on a batch."""
    lora.apply_lora(model, rank=args.rank, alpha=2.0 * args.rank)
    trainer = training.Trainer(model, config)
    return trainer.train_step


def hf_labels(batch) -> np.ndarray:
    """Labels in transformers' layout: the id itself, -100 where ignored."""
    tokens, mask = batch.tokens[0], batch.loss_mask[0]
    labels = np.full_like(tokens, -100)
    labels[:, 1:] = np.where(mask[:, :-1], tokens[:, 1:], -100)
    return labels


def peft_step(args):
    """A function running one LoRA update of transformers + peft."""
    import peft
    import torch
    import transformers

    folder, name = os.path.split(gemma_lab.default_checkpoint())
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    )
    config = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS
    )
    model = peft.get_peft_model(model, config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    def step(batch):
        out = model(
            input_ids=torch.from_numpy(batch.tokens[0].astype(np.int64)),
            attention_mask=torch.from_numpy(
                (batch.positions[0] >= 0).astype(np.int64)
            ),
            labels=torch.from_numpy(hf_labels(batch).astype(np.int64)),
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        return float(out.loss.detach())

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    if min(args.steps, args.batch_size, args.rank) < 1 or args.seq_len < 8:
        parser.error(
            "--steps, --batch-size and --rank must be >= 1, --seq-len >= 8 "
            "(the loss reads up to 8 answer positions)"
        )

    model, tokenizer = gemma_lab.load(progress=False)
    config, step_batches = batches(args, tokenizer)
    steps = {
        "gemma_lab LoRA": gemma_lab_step(args, model, config),
        "transformers + peft": peft_step(args),
    }
    for step in steps.values():
        step(step_batches[0])  # compiles, sets up kernels
    # The two alternate step by step, so that other work on the machine
    # slows both alike; each step's time is kept and the median reported.
    times = {name: [] for name in steps}
    for batch in step_batches[1:]:
        for name, step in steps.items():
            start = time.perf_counter()
            step(batch)
            times[name].append(time.perf_counter() - start)
    tokens = args.batch_size * args.seq_len
    rates = {name: tokens / np.median(t) for name, t in times.items()}
    print(
        f"batch {args.batch_size} x seq {args.seq_len}, {args.steps} steps "
        "each, alternating; median step"
    )
    for name, rate in rates.items():
        print(f"{name + ':':<24} {rate:8.1f} tokens/s")
    ours, theirs = rates.values()
    print(f"{'speed-up:':<24} {ours / theirs:8.2f}x")


if __name__ == "__main__":
    main()
