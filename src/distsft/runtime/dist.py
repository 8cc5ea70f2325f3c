"""The one place that reads the distributed environment (RANK, LOCAL_RANK, WORLD_SIZE, SLURM_*).

Everything else asks `env()` or uses the small collective helpers here, so rank logic is not scattered.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from distsft.errors import SpecError
from distsft.runtime.ports import DEFAULT_PORT


# The rank's index on its node, kept here when LOCAL_RANK is rebound to the rank's GPU under per-task GPU
# binding (runtime.devices.bind_env).
NODE_LOCAL_RANK_ENV = "DISTSFT_NODE_LOCAL_RANK"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    node_rank: int
    num_nodes: int
    master_addr: str
    master_port: int
    job_id: str | None  # SLURM job id, when under SLURM
    restart_count: int  # SLURM_RESTART_COUNT: how many times the job was requeued
    node_name: str = ""  # SLURMD_NODENAME under SLURM (several slurmd may share a host), else the hostname
    device_index: int = 0  # the CUDA device this rank uses (LOCAL_RANK; runtime.devices rebinds it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def record(self) -> dict[str, Any]:
        """What a run records about where it ran (metrics/run record)."""
        return {"world_size": self.world_size, "num_nodes": self.num_nodes, "job_id": self.job_id,
                "restart_count": self.restart_count, "master_addr": self.master_addr}


def _int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.strip().lstrip("-").isdigit() else default


@lru_cache(maxsize=1)
def env() -> DistEnv:
    """Read once: torchrun/accelerate variables first; SLURM's (one task per rank) as the fallback."""
    slurm_tasks = _int("SLURM_NTASKS", 0)
    world = _int("WORLD_SIZE", slurm_tasks or 1)
    rank = _int("RANK", _int("SLURM_PROCID", 0))
    # The rank's index on its node; when GPUs are bound per task, LOCAL_RANK names the device instead
    # (runtime.devices.bind_env) and the node-local rank is kept aside.
    local_rank = _int(NODE_LOCAL_RANK_ENV, _int("LOCAL_RANK", _int("SLURM_LOCALID", 0)))
    local_world = _int("LOCAL_WORLD_SIZE", _int("SLURM_NTASKS_PER_NODE", world))
    nodes = _int("DISTSFT_NUM_NODES", _int("SLURM_NNODES", max(1, world // max(local_world, 1))))
    return DistEnv(
        rank=rank, local_rank=local_rank, world_size=world, local_world_size=local_world,
        node_rank=_int("GROUP_RANK", _int("SLURM_NODEID", 0)), num_nodes=nodes,
        master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"), master_port=_int("MASTER_PORT", DEFAULT_PORT),
        job_id=os.environ.get("SLURM_JOB_ID"), restart_count=_int("SLURM_RESTART_COUNT", 0),
        node_name=os.environ.get("SLURMD_NODENAME") or socket.gethostname(),
        device_index=_int("LOCAL_RANK", local_rank))


def slurm_cpus_per_rank() -> int | None:
    """CPU threads each rank may use under SLURM (one task per rank), from the allocation."""
    per_task = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if per_task.isdigit():
        return max(1, int(per_task))
    on_node, tasks = os.environ.get("SLURM_CPUS_ON_NODE", ""), os.environ.get("SLURM_NTASKS_PER_NODE", "1")
    if on_node.isdigit() and tasks.isdigit() and int(tasks) > 0:
        return max(1, int(on_node) // int(tasks))
    return None


LOCK_HELD_ENV = "DISTSFT_LOCK_HELD"  # set by `distsft run`, which holds the output-dir lock for its ranks


def launcher_holds_lock() -> bool:
    return bool(os.environ.get(LOCK_HELD_ENV))


def export_torch_env(e: DistEnv) -> None:
    """Under SLURM with one task per rank there is no torchrun: give torch.distributed what it reads."""
    os.environ.update({"RANK": str(e.rank), "LOCAL_RANK": str(e.local_rank), "WORLD_SIZE": str(e.world_size),
                       "LOCAL_WORLD_SIZE": str(e.local_world_size), "MASTER_ADDR": e.master_addr,
                       "MASTER_PORT": str(e.master_port)})
    env.cache_clear()


def initialized() -> bool:
    import torch.distributed as tdist
    return tdist.is_available() and tdist.is_initialized()


def init_early(cuda: bool, timeout_s: float = 1800.0) -> None:
    """Form the default process group before the libraries do, so that rank 0 can decide things for
    every rank (the resume checkpoint, the shared-output-dir check) before anything reads a checkpoint.
    accelerate, DeepSpeed and HF reuse an initialised group. On CUDA the group carries NCCL and gloo
    (what FSDP's CPU offload needs too); the timeout is HF's ddp_timeout default."""
    e = env()
    if e.world_size <= 1 or initialized():
        return
    from datetime import timedelta

    import torch
    import torch.distributed as tdist
    from distsft.runtime import fabric
    if e.num_nodes > 1:
        found = fabric.check_gloo_interface(socket.gethostname(), [e.master_addr])
        if found:
            os.environ.update(found)
            warn(f"distsft: {socket.gethostname()} resolves to a loopback address; gloo uses "
                 f"{fabric.GLOO_IFNAME}={found[fabric.GLOO_IFNAME]}, the only other interface here")
    backend, kwargs = "gloo", {}
    if cuda:
        torch.cuda.set_device(e.device_index)
        backend = "cuda:nccl,cpu:gloo"
        # NCCL's communicator is created here instead of at the first collective: a broken fabric fails
        # at init, with the message below, not in the middle of loading.
        kwargs["device_id"] = torch.device("cuda", e.device_index)
    try:
        tdist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    except (RuntimeError, OSError, ValueError) as exc:  # DistNetworkError, DistStoreError, NCCL errors
        raise RuntimeError(fabric.init_failure(exc, e.master_addr, e.master_port, backend)) from exc


class AgreedError(SpecError):
    """A bad-input error found by rank 0 for all ranks: every rank exits 2, rank 0 alone says why."""


class PeerFailed(RuntimeError):
    """Rank 0 failed while deciding for all ranks; its own traceback is the one to read."""


def agree(decide: Any) -> Any:
    """`decide()` runs on rank 0 only; every rank gets its result, or raises its SpecError (as an
    AgreedError), so no rank decides from its own view of the file system."""
    result: tuple[str, Any] = ("ok", None)
    if env().is_main:
        try:
            result = ("ok", decide())
        except SpecError as exc:
            result = ("error", str(exc))
        except BaseException as exc:
            broadcast_object(("crash", f"{type(exc).__name__}: {exc}"))  # release the others, then fail here
            raise
    kind, value = broadcast_object(result)
    if kind == "error":
        raise AgreedError(value)
    if kind == "crash":
        raise PeerFailed(f"rank 0 failed ({value}); its own message says why")
    return value


def gather_object(obj: Any) -> list[Any]:
    """Every rank's value, in rank order, on every rank."""
    if not initialized():
        return [obj]
    import torch.distributed as tdist
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if initialized():
        import torch.distributed as tdist
        tdist.barrier()


def all_reduce(values: list[float], op: str = "sum", device: Any = None) -> list[float]:
    """Reduce a few floats across ranks in one collective (float64 so token sums stay exact)."""
    if not initialized():
        return list(values)
    import torch
    import torch.distributed as tdist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    tdist.all_reduce(t, op={"sum": tdist.ReduceOp.SUM, "max": tdist.ReduceOp.MAX, "min": tdist.ReduceOp.MIN}[op])
    return t.tolist()


def broadcast_object(obj: Any) -> Any:
    """Rank 0's value on every rank."""
    if not initialized():
        return obj
    import torch.distributed as tdist
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def print0(*args: Any, **kwargs: Any) -> None:
    """Progress and summaries come from rank 0 only."""
    if env().is_main:
        print(*args, **kwargs, flush=True)


def warn(msg: str) -> None:
    """Warnings and errors come from every rank, prefixed with it."""
    e = env()
    prefix = f"[rank {e.rank}] " if e.world_size > 1 else ""
    print(f"{prefix}{msg}", file=sys.stderr, flush=True)
