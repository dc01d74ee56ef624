"""The products of one batched decode step, timed one by one.

    python bench/bench_products.py [--rows 8] [--repeats 10]

A decode step over B rows multiplies [B, 640] activations by every weight of
the 270M once. This script times those products on random weights of the
model's shapes, so that each choice in `gemma_lab.packed` and
`gemma_lab.sampler` can be checked on the machine at hand:

- the output head from its 8-bit copy, chunk by chunk, written as
  x @ weights.T and as weights @ x.T (what `packed.matmul` uses), in
  chunks of `packed.CHUNK_ROWS` rows, and the greedy pick fused into it
  (`packed.argmax_matmul`);
- the same head from float32 weights;
- the 18 layers' float32 projections (distinct weights, so they stream from
  memory as in the model), as x @ kernel, as rows @ x.T and as the
  feature-major products of `layers.KernelRows` (transposed in and out);
- `jnp.argmax` against `layers.greedy_tokens` over the logits;
- the memory read rate (a sum over 671 MB), which bounds any product that
  reads its weights once.

The last lines turn these into the lowest step time the products allow.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from gemma_lab import packed
from gemma_lab.config import GEMMA3_270M
from gemma_lab.layers import feature_major, greedy_tokens, rows_product


def timed(fn, *args, repeats: int) -> float:
    """The fastest of `repeats` calls of `fn`, in milliseconds.

    The fastest call is the one least disturbed by other work on the
    machine, which on a shared CPU moves single calls by 30 % or more.
    """
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def chunked_head(x, matrix, *, weights_first: bool):
    """The head product chunk by chunk, in either operand order."""
    r, chunk = matrix.shape[0], packed.CHUNK_ROWS
    parts = jax.tree.map(
        lambda a: a.reshape(r // chunk, chunk, a.shape[-1]), matrix
    )

    def body(_, part):
        weights = packed.unpack(part)
        return None, weights @ x.T if weights_first else x @ weights.T

    _, out = jax.lax.scan(body, None, parts)
    if weights_first:  # [R / chunk, chunk, rows]
        return out.reshape(r, x.shape[0]).T
    return jnp.moveaxis(out, 0, 1).reshape(x.shape[0], r)


def layer_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of each projection of one layer."""
    d, f = config.width, config.mlp_dim
    q = config.num_heads * config.head_dim
    kv = config.num_kv_heads * config.head_dim
    return [(d, q), (d, kv), (d, kv), (q, d), (d, f), (d, f), (f, d)]


def layer_stack(weights, inputs, product):
    """Sum of every layer's projections, product(x, weight) for each."""
    total = jnp.float32(0)
    for layer in weights:
        for x, weight in zip(inputs, layer, strict=True):
            total = total + product(x, weight).sum()
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if min(args.rows, args.repeats) < 1:
        parser.error("--rows and --repeats must be >= 1")
    config, b, n = GEMMA3_270M, args.rows, args.repeats
    rng = np.random.default_rng(0)
    v, d = config.vocab_size, config.width

    head = packed.PackedMatrix(
        jnp.asarray(rng.integers(-127, 128, (v, d)), jnp.int8),
        jnp.asarray(rng.random((v, d // 32)), jnp.float32),
    )
    x = jnp.asarray(rng.standard_normal((b, d)), jnp.float32)
    results = {}
    for name, first in (("x @ W.T", False), ("W @ x.T", True)):
        fn = jax.jit(lambda x, m, f=first: chunked_head(x, m, weights_first=f))
        results[f"head, 8-bit chunks, {name}"] = timed(fn, x, head, repeats=n)
    results["head, packed.product"] = timed(
        jax.jit(packed.product), x, head, repeats=n
    )
    results["head, packed.argmax_matmul (greedy)"] = timed(
        jax.jit(packed.argmax_matmul), x, head, repeats=n
    )
    table = packed.unpack(head)
    results["head, float32 weights"] = timed(
        jax.jit(lambda x, w: x @ w.T), x, table, repeats=n
    )
    logits = jnp.asarray(rng.standard_normal((b, v)), jnp.float32)
    results["jnp.argmax over logits"] = timed(
        jax.jit(lambda z: jnp.argmax(z, -1)), logits, repeats=3 * n
    )
    results["layers.greedy_tokens"] = timed(
        jax.jit(greedy_tokens), logits, repeats=3 * n
    )
    read = timed(jax.jit(jnp.sum), table, repeats=n)
    del table

    shapes = layer_shapes(config)
    weights = [
        [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
        for _ in range(config.num_layers)
    ]
    inputs = [jnp.ones((b, s[0]), jnp.float32) for s in shapes]

    results["18 layers' float32 projections"] = timed(
        jax.jit(lambda ws, xs: layer_stack(ws, xs, lambda x, w: x @ w)),
        weights,
        inputs,
        repeats=n,
    )
    transposed = [[w.T.copy() for w in layer] for layer in weights]
    del weights
    results["same, [out, in] weights @ x.T"] = timed(
        jax.jit(lambda ws, xs: layer_stack(ws, xs, lambda x, w: w @ x.T)),
        transposed,
        inputs,
        repeats=n,
    )
    results["same, feature-major (transposed in, out)"] = timed(
        jax.jit(
            lambda ws, xs: layer_stack(
                ws, xs, lambda x, w: rows_product(w, feature_major(x)).T
            )
        ),
        transposed,
        inputs,
        repeats=n,
    )
    print(f"fastest of {n} calls, {b} rows:")
    for name, ms in results.items():
        print(f"{name:<42} {ms:8.2f} ms")

    layer_bytes = sum(a * c for a, c in shapes) * config.num_layers * 4
    head_flops = 2 * b * v * d
    best_head = min(
        ms for name, ms in results.items() if name.startswith("head")
    )
    print(
        f"\nmemory read rate: {v * d * 4 / read / 1e6:.1f} GB/s; the "
        f"layers' {layer_bytes / 1e6:.0f} MB take at least "
        f"{layer_bytes / (v * d * 4 / read):.1f} ms at that rate"
    )
    print(
        f"head: {head_flops / 1e9:.2f} GFLOP for {b} rows; the fastest form "
        f"runs at {head_flops / best_head / 1e6:.0f} GFLOP/s"
    )


if __name__ == "__main__":
    main()
