"""The one place that knows about devices: mesh, shardings, host batch -> global array, gathers.

Data parallel over every device of every process: a 1-D mesh with axis "data"; batches are split
along it, parameters and optimiser state are replicated. Written with `jax.jit` and
`NamedSharding` only, so the same code runs on 1 CPU, fake CPU devices, a GPU node or a TPU slice.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA = "data"


def make_mesh(devices=None) -> Mesh:
    """All devices of all processes (or the given ones) on one "data" axis.

    Auto axis types: the compiler propagates shardings (jax.make_mesh defaults to Explicit,
    which would make every batch reduction, BatchNorm's included, spell out its sharding).
    """
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), (DATA,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch_size(global_batch: int, mesh: Mesh) -> int:
    """The per-process batch; the global batch must split evenly over devices and processes."""
    if global_batch % mesh.size:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {mesh.size} devices")
    return global_batch // jax.process_count()


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's part of a batch -> global arrays sharded over "data".

    Each process passes its own rows; together they form the global batch, in process order.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}


def to_host(tree):
    """Global arrays -> numpy on every process (all-gathered across processes when needed)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    return multihost_utils.process_allgather(tree, tiled=True)



def initialize() -> None:
    """Starts JAX's multi-process runtime when the environment describes several processes:
    explicitly through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID
    (JAX_LOCAL_DEVICE_IDS optional), or as auto-detected by JAX under SLURM with several tasks
    and on multi-worker TPU VMs. A single process needs nothing."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
        local = env.get("JAX_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(
            coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env["JAX_PROCESS_ID"]),
            local_device_ids=[int(i) for i in local.split(",")] if local else None)
    elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()  # JAX reads the cluster from SLURM / the TPU metadata
