"""Load time and forward throughput: gemma_lab next to transformers.

Both load the same embedded Gemma 3 270M GGUF file and run the same token
ids in float32 on the CPU. gemma_lab's first load uses an empty cache folder,
so it includes the GGUF parse and dequantisation; the second load reads the
converted weights from that cache.

    python bench/bench_load_forward.py [--tokens 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def _timed(fn, repeats):
    fn()  # Warm-up (and, for JAX, compilation).
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_gemma_lab(ids, repeats):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import gemma_lab

    with tempfile.TemporaryDirectory() as folder:
        os.environ["GEMMA_LAB_CACHE"] = folder
        start = time.perf_counter()
        gemma_lab.load(progress=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model, _ = gemma_lab.load(progress=False)
        cached = time.perf_counter() - start
    del os.environ["GEMMA_LAB_CACHE"]

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    x = jnp.asarray(ids)
    start = time.perf_counter()
    forward(state, x).block_until_ready()
    compile_s = time.perf_counter() - start
    seconds = _timed(lambda: forward(state, x).block_until_ready(), repeats)
    return first, cached, compile_s, seconds


def bench_transformers(ids, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    from gemma_lab import default_checkpoint

    folder, name = os.path.split(default_checkpoint())
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - start
    x = torch.tensor(ids)

    def run():
        with torch.no_grad():
            model(x)

    return load_s, _timed(run, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 200_000, size=(args.batch, args.tokens))
    ids[:, 0] = 2
    n = args.batch * args.tokens

    first, cached, compile_s, ours = bench_gemma_lab(ids, args.repeats)
    hf_load, theirs = bench_transformers(ids, args.repeats)
    print(f"input: batch {args.batch} x {args.tokens} tokens, float32, CPU")
    print(f"{'':28}{'gemma_lab':>12}{'transformers':>14}")
    print(f"{'load, first (s)':28}{first:12.1f}{hf_load:14.1f}")
    print(f"{'load, cached (s)':28}{cached:12.1f}{'-':>14}")
    print(f"{'forward compile (s)':28}{compile_s:12.1f}{'-':>14}")
    print(f"{'forward (s)':28}{ours:12.3f}{theirs:14.3f}")
    print(f"{'forward (tokens/s)':28}{n / ours:12.0f}{n / theirs:14.0f}")


if __name__ == "__main__":
    main()
