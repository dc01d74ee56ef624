"""Prefill and decode speed: gemma_lab against transformers, same GGUF.

    python bench/bench_decode.py [--steps 32] [--prompt-len 512] [--rounds 3]
                                 [--without-rows]

Prints, for each library: compile (first call) time, prefill tokens/s for a
--prompt-len prompt, greedy decode tokens/s at batch 1 and batch 8, whether
the greedy tokens agree at both batch sizes, and the process's peak resident
memory (after gemma_lab alone, then after both). The two libraries are
loaded together and take turns, round by round; each speed is the median
over the rounds.

Decode speed counts decode steps only: a call generating --steps tokens
from an 8-token prompt, minus a call generating one (the prefill and the
first token), gives the time of --steps - 1 decode steps of every row.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, *args, **kwargs) -> tuple[float, object]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


def gemma_lab_runs(model, tokenizer, prompt, args):
    """(compile seconds, a function measuring one round) for gemma_lab."""
    from gemma_lab.sampler import Sampler

    sampler = Sampler(model, tokenizer)
    kw = dict(max_len=args.prompt_len + args.steps + 32, stop_ids=())

    def warm_up():
        # Compiles every shape measured below: the prompt's prefill bucket,
        # and the short prompt's prefill and decode steps at batch 1 and 8
        # (one per live-slot bucket the decode steps reach).
        sampler.generate(prompt, max_new_tokens=2, **kw)
        for batch in (1, 8):
            rows = [prompt[:8]] * batch
            sampler.generate(rows, max_new_tokens=args.steps, **kw)

    compile_s, _ = _timed(warm_up)

    def measure() -> dict:
        prefill, _ = _timed(sampler.generate, prompt, max_new_tokens=1, **kw)
        rates, outs = {}, {}
        for batch in (1, 8):
            rows = [prompt[:8]] * batch
            seconds, outs[batch] = _timed(
                sampler.generate, rows, max_new_tokens=args.steps, **kw
            )
            first, _ = _timed(sampler.generate, rows, max_new_tokens=1, **kw)
            rates[batch] = batch * (args.steps - 1) / (seconds - first)
        tokens = [list(outs[1].tokens[0]), outs[8].tokens]
        return dict(prefill=len(prompt) / prefill, rates=rates, tokens=tokens)

    return compile_s, measure


def transformers_runs(path, prompt, args):
    """(load seconds, a function measuring one round) for transformers."""
    import torch
    import transformers

    folder, name = os.path.split(path)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([prompt])

    def generate(batch, steps=args.steps):
        return model.generate(
            torch.tensor([prompt[:8]] * batch),
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
        )

    with torch.inference_mode():
        for batch in (1, 8):  # First calls set up kernels and caches.
            model.generate(
                torch.tensor([prompt[:8]] * batch),
                max_new_tokens=2,
                do_sample=False,
            )

    @torch.inference_mode()
    def measure() -> dict:
        prefill, _ = _timed(model, ids)
        rates, outs = {}, {}
        for batch in (1, 8):
            seconds, outs[batch] = _timed(generate, batch)
            first, _ = _timed(generate, batch, 1)
            rates[batch] = batch * (args.steps - 1) / (seconds - first)
        tokens = [outs[1][0, 8:].tolist(), outs[8][:, 8:].tolist()]
        return dict(prefill=len(prompt) / prefill, rates=rates, tokens=tokens)

    return load_s, measure


def median_round(rounds: list[dict]) -> dict:
    """The median of each measurement over rounds (tokens of the first)."""
    return dict(
        prefill=float(np.median([r["prefill"] for r in rounds])),
        rates={
            b: float(np.median([r["rates"][b] for r in rounds])) for b in (1, 8)
        },
        tokens=rounds[0]["tokens"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--without-rows",
        action="store_true",
        help="decode without the layers' KernelRows (batch 8 reads x @ kernel)",
    )
    args = parser.parse_args()
    if args.steps < 2 or args.rounds < 1 or args.prompt_len < 8:
        parser.error("--steps must be >= 2, --rounds >= 1, --prompt-len >= 8")

    import gemma_lab

    path = str(gemma_lab.default_checkpoint())
    model, tokenizer = gemma_lab.load(path, progress=False)
    if args.without_rows:
        from flax import nnx

        for _, module in nnx.iter_modules(model):
            if getattr(module, "rows", None) is not None:
                module.rows = nnx.data(None)
    # About ten tokens a line: enough lines for any --prompt-len.
    lines = args.prompt_len // 5 + 1
    text = " ".join(f"Line {i} of a long and plain text." for i in range(lines))
    prompt = tokenizer.encode(text)[: args.prompt_len]
    assert len(prompt) == args.prompt_len, (len(prompt), args.prompt_len)

    ours_compile, ours_measure = gemma_lab_runs(model, tokenizer, prompt, args)
    ours_peak = _peak_mb()
    theirs_load, theirs_measure = transformers_runs(path, prompt, args)
    theirs_peak = _peak_mb()
    # The libraries take turns, round by round, so that other work on the
    # machine slows both alike; each figure is the median over the rounds.
    rounds = [(ours_measure(), theirs_measure()) for _ in range(args.rounds)]
    ours = median_round([r[0] for r in rounds])
    theirs = median_round([r[1] for r in rounds])
    ours.update(compile=ours_compile, peak=ours_peak)
    theirs.update(compile=theirs_load, peak=theirs_peak)

    print(f"median of {args.rounds} alternating rounds")
    print(f"{'':28}{'gemma_lab':>12}{'transformers':>14}")
    rows = [
        ("compile / load (s)", "compile"),
        (f"prefill {len(prompt)} (tok/s)", "prefill"),
    ]
    for label, key in rows:
        print(f"{label:28}{ours[key]:12.2f}{theirs[key]:14.2f}")
    for batch in (1, 8):
        label = f"decode batch {batch} (tok/s)"
        a, b = ours["rates"][batch], theirs["rates"][batch]
        print(f"{label:28}{a:12.2f}{b:14.2f}   ratio {a / b:.2f}x")
    print(
        f"{'peak RSS after (MB)':28}{ours['peak']:12.0f}{theirs['peak']:14.0f}"
    )
    pairs = zip(ours["tokens"], theirs["tokens"], strict=True)
    for batch, (a, b) in zip((1, 8), pairs, strict=True):
        print(f"same greedy tokens at batch {batch}: {a == b}")


if __name__ == "__main__":
    main()
