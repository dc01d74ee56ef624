"""Device meshes: data-parallel batches and FSDP-style parameter sharding.

Vocabulary:
- mesh: a grid of devices with two named axes, "data" and "fsdp"
  (`make_mesh`). Batches are split over both axes together, so every
  device sees its own rows.
- FSDP-style sharding: each parameter of rank >= 2 is split along its
  largest axis that the "fsdp" size divides; each device stores only its
  slice and XLA gathers slices when a computation needs them (Zhao et al.,
  2023, PyTorch FSDP). Vectors and indivisible arrays are replicated.
- named shardings: every placement is a `jax.sharding.NamedSharding` over
  the mesh's axis names, so jit-compiled functions (the training step, the
  sampler) run unchanged: they follow the shardings of their inputs.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP = "data", "fsdp"


def make_mesh(data: int | None = None, fsdp: int = 1, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh of `data * fsdp` devices.

    Args:
        data: data-parallel size; default all devices / fsdp.
        fsdp: parameter-sharding size.
        devices: devices to use; default `jax.devices()`.

    Raises:
        ValueError: the sizes do not fit the number of devices.

    >>> make_mesh(data=1).shape  # doctest: +SKIP
    OrderedDict([('data', 1), ('fsdp', 1)])
    """
    devices = list(jax.devices() if devices is None else devices)
    if fsdp <= 0 or len(devices) % fsdp:
        raise ValueError(
            f"fsdp must divide the {len(devices)} devices, got fsdp={fsdp}"
        )
    data = len(devices) // fsdp if data is None else data
    if data <= 0 or data * fsdp > len(devices):
        raise ValueError(
            f"data * fsdp must be <= {len(devices)} devices, got "
            f"data={data}, fsdp={fsdp}"
        )
    grid = np.asarray(devices[: data * fsdp]).reshape(data, fsdp)
    return Mesh(grid, (DATA, FSDP))


def param_spec(shape: tuple[int, ...], fsdp: int) -> P:
    """FSDP partition spec: the largest axis divisible by `fsdp`, if any."""
    if len(shape) < 2 or fsdp == 1:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = FSDP
            return P(*spec)
    return P()


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Places every parameter of `model` on `mesh`, FSDP-style, in place."""
    fsdp = mesh.shape[FSDP]
    state = nnx.state(model)
    placed = jax.tree.map(
        lambda x: jax.device_put(
            x, NamedSharding(mesh, param_spec(x.shape, fsdp))
        ),
        state,
    )
    nnx.update(model, placed)
    return model


def shard_batch(batch, mesh: Mesh, *, axis: int = 0):
    """Splits every array of `batch` along `axis` over all mesh devices.

    Raises:
        ValueError: an array's `axis` is not divisible by the device count.
    """
    devices = mesh.shape[DATA] * mesh.shape[FSDP]

    def place(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.shape[axis] % devices:
            raise ValueError(
                f"batch axis {axis} has size {x.shape[axis]}; expected a "
                f"multiple of the mesh's {devices} devices"
            )
        spec = [None] * x.ndim
        spec[axis] = (DATA, FSDP)
        return jax.device_put(x, NamedSharding(mesh, P(*spec)))

    return jax.tree.map(place, batch)
