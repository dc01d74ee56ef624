"""Training throughput: gemma_lab LoRA vs transformers + peft, one run.

Both train rank-8 adapters on the seven projections of the Gemma 3 270M
(same GGUF weights, float32, CPU) on the same BBC News batches, with the
loss on answer tokens only and AdamW. gemma_lab computes output logits only
at the answer positions; transformers computes them everywhere.

    python bench/bench_train.py --steps 5 --batch-size 4 --seq-len 64

Prints training tokens per second (batch * seq_len per step) for both.
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


def bench_gemma_lab(args, model, config, step_batches) -> float:
    lora.apply_lora(model, rank=args.rank, alpha=2.0 * args.rank)
    trainer = training.Trainer(model, config)
    trainer.train_step(step_batches[0])  # compiles
    start = time.perf_counter()
    for batch in step_batches[1:]:
        trainer.train_step(batch)
    return time.perf_counter() - start


def hf_labels(batch) -> np.ndarray:
    """Labels in transformers' layout: the id itself, -100 where ignored."""
    tokens, mask = batch.tokens[0], batch.loss_mask[0]
    labels = np.full_like(tokens, -100)
    labels[:, 1:] = np.where(mask[:, :-1], tokens[:, 1:], -100)
    return labels


def bench_peft(args, step_batches) -> float:
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

    step(step_batches[0])
    start = time.perf_counter()
    for batch in step_batches[1:]:
        step(batch)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    model, tokenizer = gemma_lab.load(progress=False)
    config, step_batches = batches(args, tokenizer)
    tokens = args.steps * args.batch_size * args.seq_len
    ours = bench_gemma_lab(args, model, config, step_batches)
    del model
    theirs = bench_peft(args, step_batches)
    print(f"batch {args.batch_size} x seq {args.seq_len}, {args.steps} steps")
    print(f"gemma_lab LoRA:          {tokens / ours:8.1f} tokens/s")
    print(f"transformers + peft:     {tokens / theirs:8.1f} tokens/s")
    print(f"speed-up:                {theirs / ours:8.2f}x")


if __name__ == "__main__":
    main()
