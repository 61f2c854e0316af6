"""Devices, meshes and global arrays: data parallelism with `jax.jit` over a `Mesh`.

Why `jit` + shardings instead of `pmap`
---------------------------------------
The training step is one `jax.jit` program over *global* arrays. The batch is a global array
sharded along its leading axis over the 1-D mesh axis `'data'` (`PartitionSpec('data')`);
parameters and optimizer state are replicated (`PartitionSpec()`). The step is written as if
for one device: `loss = mean over the global batch`, `grads = jax.grad(loss)`. Because the
loss reduces over a sharded axis, the XLA SPMD partitioner inserts the all-reduce itself, so
the gradient every device sees is already the global-batch mean: no `lax.pmean`, no
`axis_name`, no leading device axis on every array, no `flax.jax_utils.replicate`.
The same program runs unchanged on 1 CPU, 8 GPUs or many hosts (each host feeds its slice of
the global batch with `host_batch_to_global`; `jax.jit` is multi-controller: every process
runs the same program on its addressable shards). It also composes with sharding parameters
later (FSDP / tensor parallelism is a different `PartitionSpec` for some params, not a
rewrite), and `donate_argnums` lets the state be updated in place. `pmap` is in maintenance
mode in current JAX and is itself implemented on top of this machinery.

Typical use in a trainer::

    maybe_initialize_distributed()          # before any other JAX call
    mesh = make_mesh()
    state = jax.jit(init_fn, out_shardings=replicated(mesh))(rng)
    step = jax.jit(train_step, in_shardings=(replicated(mesh), data_sharding(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0)
    for host_batch in loader:               # per-host batch = global batch / process_count
        state, metrics = step(state, host_batch_to_global(host_batch, mesh))
        if jax.process_index() == 0: print(fetch(metrics))
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any
DATA_AXIS = "data"

_log = logging.getLogger(__name__)


# -------------------------------------------------------------------------- multi-host init
def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from e


def _local_process_count() -> int | None:
    """Processes on this node under SLURM (`SLURM_NTASKS_PER_NODE`, or the first entry of
    `SLURM_TASKS_PER_NODE` such as '1(x2)') or Open MPI (`OMPI_COMM_WORLD_LOCAL_SIZE`)."""
    n = _env_int("SLURM_NTASKS_PER_NODE") or _env_int("OMPI_COMM_WORLD_LOCAL_SIZE")
    if n is None and os.environ.get("SLURM_TASKS_PER_NODE"):
        head = os.environ["SLURM_TASKS_PER_NODE"].split(",")[0].split("(")[0]
        n = int(head) if head.isdigit() else None
    return n


_NVIDIA_PROC = "/proc/driver/nvidia/gpus"


def _node_gpu_count() -> int | None:
    """GPUs this node gives the job: `CUDA_VISIBLE_DEVICES` (set by SLURM's gres), else
    `SLURM_GPUS_ON_NODE`, else the NVIDIA driver's GPU list; None when nothing says (CPU)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return len([d for d in visible.split(",") if d.strip()])
    n = _env_int("SLURM_GPUS_ON_NODE")
    if n is None and os.path.isdir(_NVIDIA_PROC):  # the driver lists one folder per GPU
        n = len(os.listdir(_NVIDIA_PROC)) or None
    return n


def local_device_ids_from_env() -> list[int] | None:
    """Which local GPUs this process drives, for `jax.distributed.initialize`.

    `FGD_LOCAL_DEVICE_IDS` ('0,1,2,3') wins. Otherwise, with ONE process per node under
    SLURM / Open MPI, every GPU of the node (JAX's cluster auto-detection would otherwise pin
    the process to GPU `local_rank` = 0 only, i.e. one GPU per node). With one process per GPU
    (the other supported launch) None: JAX's default `[local_rank]` is right.
    """
    explicit = os.environ.get("FGD_LOCAL_DEVICE_IDS")
    if explicit:
        try:
            return [int(x) for x in explicit.split(",") if x.strip()]
        except ValueError as e:
            raise ValueError(
                f"FGD_LOCAL_DEVICE_IDS={explicit!r}: expected comma-separated integers"
            ) from e
    if _local_process_count() == 1:
        n = _node_gpu_count()
        if n:
            return list(range(n))
    return None


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Call `jax.distributed.initialize` when this is one of several processes.

    Must run before anything else touches JAX devices. Decision, in order:
      1. explicit arguments (`python -m fgd_jax.train --coordinator_address ...`), or env
         `FGD_COORDINATOR` (`host:port`), `FGD_NUM_PROCESSES`, `FGD_PROCESS_ID`: initialize
         with those (all three needed when num_processes > 1);
      2. SLURM (`SLURM_NTASKS` > 1) or Open MPI (`OMPI_COMM_WORLD_SIZE` > 1): JAX's cluster
         auto-detection reads the rest of the environment;
      3. otherwise (one process): do nothing.
    In cases 1-2 the local GPUs come from `local_device_ids_from_env` (all GPUs of the node
    when one process per node is launched).
    Returns True when distributed JAX is (now or already) initialized.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator_address = coordinator_address or os.environ.get("FGD_COORDINATOR") or None
    if num_processes is None:
        num_processes = _env_int("FGD_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("FGD_PROCESS_ID")
    if coordinator_address is not None or (num_processes or 1) > 1:
        if num_processes is None or num_processes < 1:
            raise ValueError(
                "multi-process init: num_processes (or FGD_NUM_PROCESSES) must be >= 1 "
                f"when a coordinator is given, got {num_processes}"
            )
        if num_processes == 1:
            return False
        missing = [
            n
            for n, v in (
                ("coordinator_address / FGD_COORDINATOR", coordinator_address),
                ("process_id / FGD_PROCESS_ID", process_id),
            )
            if v is None
        ]
        if missing:
            raise ValueError(f"multi-process init with {num_processes} processes needs {missing}")
        if not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} not in [0, {num_processes})")
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            local_device_ids=local_device_ids_from_env(),
        )
        return True
    slurm = _env_int("SLURM_NTASKS") or 1
    ompi = _env_int("OMPI_COMM_WORLD_SIZE") or 1
    if slurm > 1 or ompi > 1:
        # JAX's cluster detection reads SLURM_* / OMPI_* for the coordinator and ranks.
        jax.distributed.initialize(local_device_ids=local_device_ids_from_env())
        return True
    return False


# ------------------------------------------------------------------------------ mesh / specs
def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over all devices of all processes, axis name `'data'`.

    Devices are ordered by `mesh_utils.create_device_mesh` (process-contiguous, topology
    aware on TPU/GPU), so each process's devices hold a contiguous slice of the batch.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("make_mesh: no devices")
    try:
        arr = mesh_utils.create_device_mesh((len(devices),), devices)
    except (ValueError, NotImplementedError, AssertionError):
        arr = np.asarray(sorted(devices, key=lambda d: (d.process_index, d.id)))
    return Mesh(arr, (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `'data'`, other axes whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
    """Host values (identical on every process) -> replicated global `jax.Array`s.

    Uses `make_array_from_callback`, which works with several processes, where each process
    fills only its own devices.
    """
    sharding = replicated(mesh)

    def put(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    return jax.tree.map(put, tree)


def host_batch_to_global(
    batch_np: Mapping[str, np.ndarray], mesh: Mesh, axis: str = DATA_AXIS
) -> dict[str, jax.Array]:
    """This process's slice of the global batch -> global arrays sharded on `axis`.

    Args:
      batch_np: `{key: [b, ...] array}` with `b = global_batch / jax.process_count()` rows,
        this process's rows of the global batch (process `i` holds rows
        `i*b : (i+1)*b` in a process-contiguous mesh).
      mesh: from `make_mesh`.
    Returns:
      `{key: jax.Array [global_batch, ...]}` sharded with `PartitionSpec(axis)`.
    Raises:
      ValueError: a value has no batch axis, batch sizes differ between keys, or the local
        batch does not split evenly over this process's devices.
    """
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    n_local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    sizes = {}
    out = {}
    for key, value in batch_np.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch[{key!r}] is a scalar; every batch value needs a batch axis")
        sizes[key] = value.shape[0]
        if value.shape[0] % max(n_local, 1):
            raise ValueError(
                f"batch[{key!r}] has {value.shape[0]} rows on process {jax.process_index()}, "
                f"not divisible by its {n_local} local devices"
            )
        if value.dtype == np.int64 and not jax.config.jax_enable_x64:
            value = value.astype(np.int32)  # what JAX would do anyway, without the warning
        elif value.dtype == np.float64 and not jax.config.jax_enable_x64:
            value = value.astype(np.float32)
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch values have different batch sizes: {sizes}")
    return out


# --------------------------------------------------------------------------------- helpers
def fetch(tree: PyTree) -> PyTree:
    """Device values -> numpy / Python scalars, on any process.

    Fully addressable arrays are copied; replicated global arrays read this process's copy;
    other (sharded, multi-host) arrays are all-gathered (a collective: call on every process).
    Scalars come back as Python floats / ints.
    """

    def get(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_addressable:
            v = np.asarray(jax.device_get(x))
        elif x.is_fully_replicated:
            v = np.asarray(x.addressable_data(0))
        else:
            v = np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return v.item() if v.ndim == 0 else v

    return jax.tree.map(get, tree)


def sync(name: str = "fgd_jax_sync") -> None:
    """Barrier across processes (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def enable_compilation_cache(path: str | None = None) -> None:
    """Persistent XLA compilation cache (on by default in every command), so a restarted run
    or a repeated evaluation does not pay compilation again. `FGD_JAX_COMPILATION_CACHE`
    overrides the directory; '' disables."""
    path = os.environ.get("FGD_JAX_COMPILATION_CACHE", path) if path is None else path
    if path is None:
        path = os.path.expanduser("~/.cache/fgd_jax/xla")
    if not path:
        return
    try:
        jax.config.update("jax_compilation_cache_dir", path)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
    except Exception as e:  # noqa: BLE001 - a cache problem must never stop training
        _log.warning("compilation cache disabled: %s", e)
