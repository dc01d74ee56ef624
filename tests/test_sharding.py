"""Meshes and shardings; the 8-device checks run in a subprocess.

XLA_FLAGS must be set before JAX starts, so the multi-device run happens in
a fresh interpreter with 8 simulated CPU devices.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

from gemma_lab import sharding

_MESH_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, numpy as np
    from flax import nnx
    from gemma_lab import lora, sampler, sharding, testing, training

    def adapted():
        model = lora.apply_lora(testing.tiny_model(), rank=4)
        rngs = nnx.Rngs(1)
        for m in lora.adapters(model).values():
            m.lora_b[...] = 0.05 * jax.random.normal(
                rngs.params(), m.lora_b[...].shape)
        return model

    rng = np.random.default_rng(0)
    seqs = [([2, *rng.integers(3, 500, 15).tolist()], 6) for _ in range(8)]
    config = training.TrainConfig(steps=2, batch_size=8, seq_len=24,
                                  warmup_steps=0, learning_rate=1e-2)
    batch = jax.tree.map(lambda x: x[None],
                         training.make_batch(seqs, seq_len=24))

    single = training.Trainer(adapted(), config)
    mesh = sharding.make_mesh(data=2, fsdp=4)
    sharded = training.Trainer(adapted(), config, mesh=mesh)
    kernel = sharded.model.layers[0].mlp.up_proj.base.kernel[...]
    out = {
        "devices": jax.device_count(),
        "kernel_shards": len(kernel.addressable_shards),
        "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape),
        "single": [single.train_step(batch) for _ in range(2)],
        "mesh": [sharded.train_step(batch) for _ in range(2)],
        "greedy_single": sampler.greedy(single.sync(), [2, 7, 9],
                                        max_new_tokens=5),
        "greedy_mesh": sampler.greedy(sharded.sync(), [2, 7, 9],
                                      max_new_tokens=5),
    }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def mesh_run():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, "-c", _MESH_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


def test_mesh_training_loss_equals_single_device_loss(mesh_run):
    assert mesh_run["devices"] == 8
    for single, mesh in zip(mesh_run["single"], mesh_run["mesh"], strict=True):
        assert abs(single - mesh) < 1e-4
    assert mesh_run["single"][-1] < mesh_run["single"][0]


def test_parameters_are_sharded_fsdp_style(mesh_run):
    # up_proj kernel [64, 128]: its 128 axis is split over fsdp = 4.
    assert mesh_run["kernel_shards"] == 8
    assert mesh_run["kernel_shard_shape"] == [64, 32]


def test_sampler_runs_unchanged_on_a_mesh(mesh_run):
    assert mesh_run["greedy_mesh"] == mesh_run["greedy_single"]


def test_param_spec_shards_the_largest_divisible_axis():
    assert sharding.param_spec((640, 2048), 4) == P(None, "fsdp")
    assert sharding.param_spec((262144, 640), 8) == P("fsdp", None)
    assert sharding.param_spec((6, 10), 4) == P()
    assert sharding.param_spec((640,), 4) == P()


def test_make_mesh_rejects_sizes_that_do_not_fit():
    count = jax.device_count()
    with pytest.raises(ValueError, match="fsdp must divide"):
        sharding.make_mesh(fsdp=count + 1)
    with pytest.raises(ValueError, match="data \\* fsdp must be"):
        sharding.make_mesh(data=count + 1)
