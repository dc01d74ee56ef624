"""Where a batched decode step spends its time, from a `jax.profiler` trace.

    python bench/profile_decode.py [--batch 8] [--steps 10] [--max-len 576]

Runs greedy decode steps of the embedded 270M through the sampler's compiled
step (an 8-token prompt, a cache of --max-len slots, as in
`bench_decode.py`), traces --steps of them, and prints per step:

- the wall time, and how long each XLA worker thread was busy running
  kernels: the difference is time spent between kernels (handing work from
  one to the next), which no faster kernel removes;
- how many kernels ran, and the ones that took longest, summed over
  threads, with the shape each one writes (read from the compiled HLO).

The trace is written to --trace-dir, for TensorBoard or Perfetto.
"""

from __future__ import annotations

import argparse
import collections
import pathlib
import re
import tempfile
import time

import numpy as np


def decode_steps(batch: int, max_len: int, steps: int):
    """(step function, compiled HLO text) for `steps` greedy decode steps."""
    import jax
    import jax.numpy as jnp

    import gemma_lab
    from gemma_lab.decoding import live_cache, live_slots
    from gemma_lab.sampler import Sampler

    model, tokenizer = gemma_lab.load(progress=False)
    sampler = Sampler(model, tokenizer)
    text = " ".join(f"Line {i} of a long and plain text." for i in range(20))
    prompt = tokenizer.encode(text)[:8]
    warm = sampler.generate(
        [prompt] * batch, max_new_tokens=2, max_len=max_len, stop_ids=()
    )
    # The rings cut to the slots in use, as the sampler decodes: one size
    # covers every step profiled.
    sizes = [layer.positions.shape[1] for layer in warm.cache]
    live = live_slots(max(warm.lengths) + steps + 1, max(sizes))
    state = {
        "new": jnp.asarray([row[-1] for row in warm.tokens], jnp.int32),
        "cache": live_cache(warm.cache, live, sizes),
        "lengths": np.asarray(warm.lengths),
    }
    flags = dict(greedy=True, top_k=None, use_top_p=False, with_logprobs=False)
    key, low, one = jax.random.key(0), jnp.float32(1e-6), jnp.float32(1.0)

    def arguments():
        lengths = jnp.asarray(state["lengths"], jnp.int32)
        return (sampler._leaves, state["new"], lengths, state["cache"], key, 1)

    hlo = (
        sampler._decode.lower(
            *arguments(), low, one, with_logits=False, **flags
        )
        .compile()
        .as_text()
    )

    def step():
        out = sampler._decode(
            *arguments(), low, one, with_logits=False, **flags
        )
        state["new"], state["cache"] = out[0], out[3]
        state["lengths"] = state["lengths"] + 1
        np.asarray(state["new"])  # wait for the step

    return step, hlo


def kernel_shapes(hlo: str) -> dict[str, str]:
    """{instruction name: the shape it writes} for the compiled HLO."""
    shapes = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) ", line)
        if match:
            shapes[match.group(1)] = match.group(2)
    return shapes


def worker_events(trace_dir: pathlib.Path):
    """{thread name: [(kernel name, ns)]} for XLA's worker threads."""
    from jax._src.lib import _profile_data

    path = sorted(trace_dir.glob("**/*.xplane.pb"))[-1]
    data = _profile_data.ProfileData.from_file(str(path))
    threads = {}
    for plane in data.planes:
        for line in plane.lines:
            if "XLAEigen" in line.name:
                threads[line.name] = [
                    (event.name, event.duration_ns) for event in line.events
                ]
    return threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-len", type=int, default=576)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--trace-dir", type=pathlib.Path, default=None)
    args = parser.parse_args()
    if min(args.batch, args.steps, args.top) < 1 or args.max_len < 16:
        parser.error("--batch, --steps and --top must be >= 1, --max-len >= 16")

    import jax

    step, hlo = decode_steps(args.batch, args.max_len, args.steps + 3)
    for _ in range(3):
        step()
    trace_dir = args.trace_dir or pathlib.Path(tempfile.mkdtemp())
    jax.profiler.start_trace(str(trace_dir))
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    wall_ms = (time.perf_counter() - start) / args.steps * 1e3
    jax.profiler.stop_trace()

    threads = worker_events(trace_dir)
    kernels, counts = collections.Counter(), collections.Counter()
    print(f"batch {args.batch}, {args.max_len} cache slots: {wall_ms:.1f} ms")
    for name, events in sorted(threads.items()):
        busy = sum(
            ns for kind, ns in events if kind == "ThunkExecutor::Execute"
        )
        print(f"  thread {name[-8:]} busy {busy / 1e6 / args.steps:6.1f} ms")
        for kind, ns in events:
            if kind.startswith(("ThunkExecutor", "Threadpool", "Slinky")):
                continue
            if not kind.startswith("end: "):
                kernels[kind] += ns
                counts[kind] += 1
    total = sum(counts.values()) / args.steps
    print(f"{total:.0f} kernel runs per step (summed over threads); longest:")
    shapes = kernel_shapes(hlo)
    for name, ns in kernels.most_common(args.top):
        ms, runs = ns / 1e6 / args.steps, counts[name] / args.steps
        print(f"  {ms:7.2f} ms {runs:6.1f}x  {name:<34} {shapes.get(name, '')}")
    print(f"trace: {trace_dir}")


if __name__ == "__main__":
    main()
