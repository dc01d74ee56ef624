"""Batched greedy decode steps at several sizes of `packed.CHUNK_ROWS`.

    python bench/bench_chunk_rows.py [--chunks 2048 4096 8192] [--rounds 6]
                                     [--batch 8] [--steps 32]

The output head of a decode step over 2 to 16 rows is unpacked from its
8-bit copy `packed.CHUNK_ROWS` rows at a time. The best size depends on the
CPU's caches, so this script builds one sampler per size over the embedded
270M (one compiled decode step each), lets them take turns round by round,
and prints each size's milliseconds per decode step (the median over the
rounds) and whether all sizes give the same greedy tokens.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def step_ms(sampler, rows, steps: int, **kw) -> tuple[float, list]:
    """(ms per decode step, tokens): a call of `steps` tokens minus one."""
    start = time.perf_counter()
    out = sampler.generate(rows, max_new_tokens=steps, **kw)
    middle = time.perf_counter()
    sampler.generate(rows, max_new_tokens=1, **kw)
    first = time.perf_counter() - middle
    return (middle - start - first) / (steps - 1) * 1e3, out.tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--chunks", type=int, nargs="+", default=[2048, 4096],
        help="sizes of packed.CHUNK_ROWS to compare",
    )  # fmt: skip
    parser.add_argument("--rounds", type=int, default=6, help="turns each")
    parser.add_argument("--batch", type=int, default=8, help="rows decoded")
    parser.add_argument(
        "--steps", type=int, default=32, help="tokens generated per call"
    )
    args = parser.parse_args()
    args.chunks = list(dict.fromkeys(args.chunks))  # each size once
    if args.steps < 2 or args.rounds < 1 or not 2 <= args.batch <= 16:
        parser.error("--steps must be >= 2, --rounds >= 1, --batch in [2, 16]")
    if any(c < 256 or 262144 % c for c in args.chunks):
        parser.error("--chunks must divide 262,144 and be >= 256")

    import gemma_lab
    from gemma_lab import decoding, packed
    from gemma_lab.sampler import Sampler

    model, tokenizer = gemma_lab.load()
    prompt = tokenizer.encode("The history of the river valley begins")[:8]
    rows = [prompt] * args.batch
    kw = dict(max_len=args.steps + 40, stop_ids=())

    samplers = {}
    for chunk in args.chunks:
        # A new compiled step per size: the chunk is read when tracing.
        packed.CHUNK_ROWS = chunk
        decoding.compiled_steps.cache_clear()
        samplers[chunk] = Sampler(model, tokenizer)
        step_ms(samplers[chunk], rows, args.steps, **kw)

    times = {chunk: [] for chunk in args.chunks}
    tokens = {}
    for _ in range(args.rounds):
        for chunk, sampler in samplers.items():
            ms, tokens[chunk] = step_ms(sampler, rows, args.steps, **kw)
            times[chunk].append(ms)

    print(f"batch {args.batch}, median of {args.rounds} alternating rounds")
    for chunk, values in times.items():
        print(f"CHUNK_ROWS {chunk:>6}: {np.median(values):6.1f} ms a step")
    same = all(t == tokens[args.chunks[0]] for t in tokens.values())
    print(f"same greedy tokens at every size: {same}")


if __name__ == "__main__":
    main()
