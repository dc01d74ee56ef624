"""The full default LoRA run on BBC News topics, recorded for the README.

Measures the held-out exact-match accuracy of the base Gemma 3 270M, trains
rank-8 adapters with the notebook's default settings, measures again and
writes both numbers (and the loss curve) to a JSON file.

    python scripts/lora_full_run.py --out lora_full_run.json

Not part of CI: it takes about 15 minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import gemma_lab
from gemma_lab import data, lora, training


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--held-out", type=int, default=200)
    parser.add_argument("--max-words", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default="lora_run.json")
    parser.add_argument("--adapter", type=pathlib.Path, default=None)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start = time.time()
    model, tokenizer = gemma_lab.load()
    train_set, held_out = data.bbc_news_topics(
        num_held_out=args.held_out, seed=args.seed, max_words=args.max_words
    )
    before = data.exact_match(model, tokenizer, held_out)
    print(f"base model held-out accuracy: {before.accuracy:.3f}", flush=True)

    lora.apply_lora(model, rank=args.rank)
    config = training.TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        max_targets=4,
        learning_rate=args.learning_rate,
        eval_every=0,
        seed=args.seed,
    )
    encoded = data.encode(tokenizer, train_set, seq_len=args.seq_len)
    history = training.train(model, encoded, config)
    after = data.exact_match(lora.merged_model(model), tokenizer, held_out)
    print(f"LoRA held-out accuracy: {after.accuracy:.3f}", flush=True)

    if args.adapter is not None:
        lora.save_adapter(model, args.adapter)
    record = {
        "held_out_examples": len(held_out),
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "config": config.__dict__,
        "rank": args.rank,
        "losses": history.losses,
        "seconds": round(time.time() - start, 1),
        "predictions": [
            {"reference": e.answer, "before": b, "after": a}
            for e, b, a in zip(
                held_out, before.predictions, after.predictions, strict=True
            )
        ],
    }
    args.out.write_text(json.dumps(record, indent=1))
    print(
        json.dumps(
            {
                k: record[k]
                for k in ("accuracy_before", "accuracy_after", "seconds")
            }
        )
    )


if __name__ == "__main__":
    main()
