"""The one place that knows about devices: mesh, shardings, host batch -> global array, gathers.

Data parallel over every device of every process: a 1-D mesh with axis "data"; batches are split
along it, parameters and optimiser state are replicated. Written with `jax.jit` and
`NamedSharding` only, so the same code runs on 1 CPU, fake CPU devices, a GPU node or a TPU slice.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from abaw_jax.errors import ConfigError, UserError

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
        raise ConfigError(f"batch_size {global_batch} is not divisible by the {mesh.size} devices")
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


def all_processes(ok: bool) -> bool:
    """True when `ok` is true on every process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


def on_process_0(fn: Callable[[], Any], what: str) -> None:
    """Runs `fn` (file writing) on process 0 only; every process returns when it is done, and
    raises if it failed (rather than the others waiting for it forever)."""
    error = None
    if jax.process_index() == 0:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, after telling the others
            error = e
    if not all_processes(error is None):
        if error is not None:
            raise error
        raise RuntimeError(f"process 0 failed {what}; see its log")


def barrier(name: str) -> None:
    """Waits until every process gets here (for file operations done by process 0)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


class CoordinatorUnreachableError(UserError, ConnectionError):
    """This process could not reach the coordinator (process 0) in time."""


def initialize(timeout_s: int | None = None) -> None:
    """Starts JAX's multi-process runtime when the environment describes several processes.

    - Explicitly: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES,
      JAX_PROCESS_ID and optionally JAX_LOCAL_DEVICE_IDS (comma-separated), as
      `launch/local.sh` sets them.
    - Auto-detected by JAX under SLURM with several tasks and on multi-worker TPU VMs. Under
      SLURM with one task per node, all of the node's GPUs are used (JAX would otherwise give
      each task one GPU); JAX_LOCAL_DEVICE_IDS overrides.
    A single process needs nothing. Every process must reach the coordinator within `timeout_s`
    (ABAW_JAX_INIT_TIMEOUT, default 300 s); one that cannot fails with a message saying which
    address it tried, instead of JAX's abort. On CPU, a collective then waits as long for a slow
    peer (`_follow_timeout`), and the links between the devices are formed at once
    (`_link_devices`).
    """
    env = os.environ
    if timeout_s is None:
        timeout_s = int(env.get("ABAW_JAX_INIT_TIMEOUT", "300"))
    local = env.get("JAX_LOCAL_DEVICE_IDS")
    local_ids = [int(i) for i in local.split(",")] if local else None
    if "JAX_COORDINATOR_ADDRESS" in env:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in env]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {missing} are not")
        address, count = env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"])
        index = int(env["JAX_PROCESS_ID"])
        if count == 1:
            return
        logging.info("process %d of %d: joining the coordinator at %s (timeout %d s)", index,
                     count, address, timeout_s)
        if index != 0:  # process 0 hosts the coordinator; the others check they can reach it
            _wait_for(address, timeout_s, index, count)
        _follow_timeout(timeout_s)
        jax.distributed.initialize(
            coordinator_address=address, num_processes=count, process_id=index,
            local_device_ids=local_ids, initialization_timeout=timeout_s)
    elif int(env.get("SLURM_NTASKS", "1")) > 1:
        if local_ids is None and _slurm_tasks_per_node(env) == 1 and env.get("SLURM_GPUS_ON_NODE"):
            local_ids = list(range(int(env["SLURM_GPUS_ON_NODE"])))
        _follow_timeout(timeout_s)
        jax.distributed.initialize(local_device_ids=local_ids, initialization_timeout=timeout_s)
    elif "," in env.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize(initialization_timeout=timeout_s)
    else:
        return
    global _distributed
    _distributed = True
    logging.info("process %d of %d: %d local of %d devices (%s)", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(),
                 jax.devices()[0].device_kind)
    barrier("initialized")
    _link_devices()


# XLA:CPU's deadlines for a collective whose peers have not all arrived, with XLA's defaults:
# the gloo operations across processes (30 min), and the device threads of one process (40 s,
# which a step's all-reduce once missed on the busy 2-core machine). A slow peer is not a
# failure: each follows the run's timeout where that is longer.
_CPU_COLLECTIVE_TIMEOUTS = {"xla_cpu_collective_timeout_seconds": 30 * 60,
                            "xla_cpu_collective_call_terminate_timeout_seconds": 40}


def _follow_timeout(timeout_s: int) -> None:
    """Raises XLA:CPU's collective deadlines to the run's own timeout, unless XLA_FLAGS sets
    them (XLA reads the variable when the backend starts, which `initialize` precedes)."""
    flags = os.environ.get("XLA_FLAGS", "")
    extra = [f"--{name}={max(timeout_s, default)}"
             for name, default in _CPU_COLLECTIVE_TIMEOUTS.items() if name not in flags]
    if extra:
        os.environ["XLA_FLAGS"] = " ".join([flags, *extra]).strip()


def _link_devices() -> None:
    """Forms the CPU collectives' links over every device now, while the processes are in step.

    XLA:CPU's gloo forms the link of a group of devices at its first collective, and every
    process must get there within 30 s (a fixed deadline in jaxlib, "Gloo context
    initialization failed: DEADLINE_EXCEEDED ... GetKeyValue() timed out"). Left to the first
    train step, each process got there after its own compile and start-up, which differed by
    more than that on a busy 2-core machine. Formed here, the train and eval steps' collectives
    over the whole "data" mesh find the link made and wait as long as the collective timeout
    (`--xla_cpu_collective_timeout_seconds`). The barrier before this one (one device per
    process gathered) formed the links of the per-process gathers the same way.
    """
    if jax.devices()[0].platform != "cpu":
        return
    mesh = make_mesh()
    # Not `to_global`: tests/test_distributed.py delays a peer's first train step through it.
    ones = jax.make_array_from_process_local_data(
        batch_sharding(mesh), np.ones(jax.local_device_count(), np.int32))
    total = jax.jit(lambda x: x.sum(), out_shardings=replicated(mesh))(ones)
    if int(total.addressable_data(0)) != jax.device_count():
        raise RuntimeError(f"the devices' first all-reduce gave {total}, not "
                           f"{jax.device_count()}")


_distributed = False  # set once `initialize` started JAX's multi-process runtime


def shutdown() -> None:
    """Leaves the multi-process runtime at the end of a run that finished on every process.

    Explicitly, rather than in JAX's exit hook: there the processes tear down while Python
    unloads, and a process whose coordination service or peers went away first aborted
    (`CoordinationServiceAgent::SetError`, "Fatal Python error: Aborted", rc != 0 on a
    preempted run that SLURM would then not requeue). Here every process waits (up to
    `shutdown_timeout_seconds`, 300 s) in JAX's shutdown barrier for the slowest peer.
    """
    global _distributed
    if _distributed:
        _distributed = False
        jax.distributed.shutdown()


def _slurm_tasks_per_node(env) -> int | None:
    per_node = env.get("SLURM_NTASKS_PER_NODE", "")
    if per_node.isdigit():
        return int(per_node)
    tasks, nodes = int(env.get("SLURM_NTASKS", "1")), int(env.get("SLURM_NNODES", "1"))
    return tasks // nodes if tasks % nodes == 0 else None


def _wait_for(address: str, timeout_s: float, index: int, count: int) -> None:
    """Polls a TCP connection to the coordinator until it accepts or the time is up."""
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=2).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise CoordinatorUnreachableError(
                    f"process {index} of {count} could not reach the coordinator at {address} "
                    f"within {timeout_s:.0f} s ({e}). Is process 0 running, is "
                    f"JAX_COORDINATOR_ADDRESS its address (not 127.0.0.1 across machines) and "
                    f"is the port open between the hosts? See launch/README.md, "
                    f"'Troubleshooting'.") from None
            time.sleep(0.5)


# glibc malloc serves XLA:CPU's buffer of temporaries (~2.5 GB for a DDAMFN train step at batch
# 32) with a fresh mmap at every step, and the kernel zero-fills every page on first touch: about
# a quarter of the step's CPU time went to page faults (600k per step). tcmalloc keeps and reuses
# the memory. Only a preload replaces the allocator, so this can only be detected and advised.
TCMALLOC = "libtcmalloc_minimal.so.4"


def host_allocator() -> str:
    """'tcmalloc', 'jemalloc' or 'glibc': the malloc this process runs on (Linux; else 'glibc')."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "glibc"
    return next((name for name in ("tcmalloc", "jemalloc") if f"lib{name}" in maps), "glibc")


def check_host_allocator() -> None:
    """On the CPU backend, warns once when tcmalloc is not preloaded, with the command."""
    allocator = host_allocator()
    if jax.default_backend() != "cpu" or allocator == "tcmalloc":
        return
    logging.warning(
        "CPU backend on %s malloc: a train step takes ~1.4x as long as with tcmalloc, since "
        "XLA's temporaries are mapped afresh at every step. Preload it: LD_PRELOAD=%s python "
        "-m abaw_jax.main ... (Debian/Ubuntu: apt-get install libtcmalloc-minimal4; README, "
        "'Speed on CPU').", allocator, TCMALLOC)
