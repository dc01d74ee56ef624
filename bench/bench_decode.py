"""Prefill and decode speed: gemma_lab against transformers, same GGUF.

    python bench/bench_decode.py [--steps 32] [--prompt-len 512]

Prints, for each library: compile (first call) time, prefill tokens/s for a
--prompt-len prompt, greedy decode tokens/s at batch 1 and batch 8, whether
the greedy tokens agree, and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_gemma_lab(model, tokenizer, prompt, args) -> dict:
    from gemma_lab.sampler import Sampler

    sampler = Sampler(model, tokenizer)
    kw = dict(max_len=args.prompt_len + args.steps + 32, stop_ids=())
    start = time.perf_counter()
    # Compiles every shape measured below: the prompt's prefill bucket, and
    # the short prompt's prefill and decode steps at batch 1 and 8.
    sampler.generate(prompt, max_new_tokens=2, **kw)
    for batch in (1, 8):
        sampler.generate([prompt[:8]] * batch, max_new_tokens=2, **kw)
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    sampler.generate(prompt, max_new_tokens=1, **kw)
    prefill = len(prompt) / (time.perf_counter() - start)
    rates, tokens = {}, None
    for batch in (1, 8):
        rows = [prompt[:8]] * batch
        start = time.perf_counter()
        out = sampler.generate(rows, max_new_tokens=args.steps, **kw)
        rates[batch] = batch * args.steps / (time.perf_counter() - start)
        tokens = tokens or out.tokens[0]
    return dict(compile=compile_s, prefill=prefill, rates=rates, tokens=tokens)


def bench_transformers(path, prompt, args) -> dict:
    import torch
    import transformers

    folder, name = os.path.split(path)
    start = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - start
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        for batch in (1, 8):  # First calls set up kernels and caches.
            model.generate(
                torch.tensor([prompt[:8]] * batch),
                max_new_tokens=2,
                do_sample=False,
            )
        start = time.perf_counter()
        model(ids)
        prefill = len(prompt) / (time.perf_counter() - start)
        rates, tokens = {}, None
        for batch in (1, 8):
            rows = torch.tensor([prompt[:8]] * batch)
            start = time.perf_counter()
            out = model.generate(
                rows,
                max_new_tokens=args.steps,
                min_new_tokens=args.steps,
                do_sample=False,
            )
            rates[batch] = batch * args.steps / (time.perf_counter() - start)
            tokens = tokens or out[0, 8:].tolist()
    return dict(compile=load_s, prefill=prefill, rates=rates, tokens=tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=512)
    args = parser.parse_args()

    import gemma_lab

    path = str(gemma_lab.default_checkpoint())
    model, tokenizer = gemma_lab.load(path, progress=False)
    text = " ".join(f"Line {i} of a long and plain text." for i in range(200))
    prompt = tokenizer.encode(text)[: args.prompt_len]

    ours = bench_gemma_lab(model, tokenizer, prompt, args)
    ours["peak"] = _peak_mb()
    theirs = bench_transformers(path, prompt, args)
    theirs["peak"] = _peak_mb()

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
    same = np.array_equal(ours["tokens"], theirs["tokens"])
    print(f"same greedy tokens at batch 1: {same}")


if __name__ == "__main__":
    main()
