"""What a SLURM job asks for besides nodes and tasks: GPUs, CPUs per rank and memory per node.

Without `--cpus-per-task` every rank gets one core (data loading and tokenization starve the GPUs), and
without `--mem` the site's default memory per CPU applies (often a few GB per core: `from_pretrained` is
OOM-killed). Explicit `slurm.cpus_per_task` / `slurm.mem_gb` win; otherwise:

* CPUs per rank: the partition's smallest node's CPUs divided by the ranks per node (`sinfo %c`), or
  DEFAULT_CPUS_PER_RANK when sinfo cannot say (a dry run on a machine without SLURM);
* memory per node: the node's share for the GPUs (or CPUs) the job takes, but at least what the ranks
  need on the host (`host_need_gb`: the copies of the weights `from_pretrained` holds, plus a fixed
  per-rank overhead), and never more than the node has;
* GPUs: `--gpus-per-node` when `slurm.request_gpus` is true, or, left unset, when the partition's nodes
  have a `gpu` GRES (`sinfo %G`). Whether a rank then trains on a GPU is decided in the rank from what
  it sees (runtime.devices), never from this guess.
"""

from __future__ import annotations

import math
import re
import subprocess
from dataclasses import dataclass
from typing import Any

DEFAULT_CPUS_PER_RANK = 8
# Host memory a rank needs besides model weights: the CUDA context and torch (~3-5 GB), pinned
# transfer buffers, the memory-mapped data, the tokenizer: measured 2-5 GB; with headroom.
RANK_OVERHEAD_GB = 8
GIB = 2**30


@dataclass(frozen=True)
class NodeInfo:
    """The smallest node of the partition: what a job can count on whichever nodes it lands on."""
    cpus: int
    mem_mb: int
    gpus: int


_GPU_GRES = re.compile(r"gpu(?::[^:,()\s]+)?:(\d+)")


def gres_gpus(gres: str) -> int:
    """GPUs in a GRES string: `gpu:8`, `gpu:a100:4(S:0-1)`, `gpu:2,shard:4`; 0 for `(null)`."""
    return sum(int(m.group(1)) for m in _GPU_GRES.finditer(gres or ""))


def parse_sinfo(text: str) -> NodeInfo | None:
    """`sinfo -h -N -o '%c %m %G'` lines -> the smallest node (CPUs, memory and GPUs taken separately)."""
    rows = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[0].isdigit():
            continue
        mem = parts[1].rstrip("+")
        rows.append((int(parts[0]), int(mem) if mem.isdigit() else 0, gres_gpus(" ".join(parts[2:]))))
    if not rows:
        return None
    return NodeInfo(cpus=min(r[0] for r in rows), mem_mb=min(r[1] for r in rows), gpus=min(r[2] for r in rows))


def query_nodes(partition: str | None) -> NodeInfo | None:
    """Ask sinfo about the partition's nodes; None when there is no sinfo or it fails."""
    try:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%c %m %G", *(["-p", partition] if partition else [])],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return parse_sinfo(p.stdout) if p.returncode == 0 else None


def host_need_gb(num_parameters: int | None, load_bytes: float, copies: int, ranks_per_node: int) -> int | None:
    """Host memory the first node's ranks need while the model loads: `copies` full copies of the weights
    at `load_bytes` per parameter (1 when rank 0 alone loads: FSDP2, ZeRO-3; one per rank otherwise) plus
    RANK_OVERHEAD_GB per rank. None without a parameter count."""
    if num_parameters is None:
        return None
    return int(math.ceil(num_parameters * load_bytes * copies * 1.1 / GIB + RANK_OVERHEAD_GB * ranks_per_node))


def load_bytes(spec: Any) -> float:
    """Bytes per parameter of the copy `from_pretrained` makes (train.model.weights_dtype, as on a
    bf16 GPU): fp32 for full fine-tuning outside DeepSpeed, 16-bit otherwise, unless model.torch_dtype
    says."""
    explicit = {"float32": 4, "bfloat16": 2, "float16": 2}.get(spec.model.torch_dtype)
    if explicit:
        return explicit
    return 4 if spec.peft.method == "none" and spec.distributed.backend != "deepspeed" else 2


def load_copies(spec: Any) -> int:
    """Full copies of the weights on the first node while loading: one when rank 0 alone reads them
    (FSDP2 but QLoRA: train.rank0_load; ZeRO-3: transformers reads on rank 0, the others get meta),
    one per rank otherwise."""
    d = spec.distributed
    if (d.backend == "fsdp" and spec.peft.method != "qlora") or (d.backend == "deepspeed" and d.stage == 3):
        return 1
    return d.gpus_per_node


def wants_gpus(request: bool | None, node: NodeInfo | None, dry_run: bool) -> bool:
    """`slurm.request_gpus`, or when unset: the partition has GPU nodes (a dry run without sinfo shows
    what a GPU cluster would get)."""
    if request is not None:
        return request
    if node is None:
        return dry_run
    return node.gpus > 0


def resources(spec: Any, node: NodeInfo | None, need_gb: int | None, dry_run: bool = False) -> dict[str, Any]:
    """submitit SlurmExecutor parameters for GPUs, CPUs and memory, and `notes` (what was derived and
    from what, for the dry run and the submit message)."""
    s, d = spec.slurm, spec.distributed
    tasks = d.gpus_per_node
    gpus = wants_gpus(s.request_gpus, node, dry_run)
    notes: list[str] = []
    out: dict[str, Any] = {}
    if gpus:
        out["gpus_per_node"] = tasks
    if s.cpus_per_task is not None:
        cpus = s.cpus_per_task
    elif node is not None:
        cpus = max(1, node.cpus // tasks)
        notes.append(f"cpus_per_task {cpus} = the node's {node.cpus} CPUs / {tasks} ranks")
    else:
        cpus = DEFAULT_CPUS_PER_RANK
        notes.append(f"cpus_per_task {cpus} (default; sinfo could not say how many CPUs the nodes have)")
    out["cpus_per_task"] = cpus
    if s.mem_gb is not None:
        out["mem"] = f"{s.mem_gb}GB"
        if node is not None and s.mem_gb * 1024 > node.mem_mb:
            notes.append(f"warning: slurm.mem_gb={s.mem_gb} is more than the partition's smallest node has "
                         f"({node.mem_mb // 1024} GB); SLURM will not start the job there")
        return {**out, "notes": notes}
    mem = _default_mem_gb(node, tasks, cpus, gpus, need_gb, notes)
    out["mem"] = f"{mem}GB"
    return {**out, "notes": notes}


def _default_mem_gb(node: NodeInfo | None, tasks: int, cpus: int, gpus: bool, need_gb: int | None,
                    notes: list[str]) -> int:
    fallback = need_gb if need_gb is not None else RANK_OVERHEAD_GB * 2 * tasks
    if node is None or node.mem_mb <= 0:
        notes.append(f"mem {fallback} GB per node ("
                     + ("the model's load copies + per-rank overhead" if need_gb is not None else
                        f"{RANK_OVERHEAD_GB * 2} GB per rank") + "; sinfo could not say what the nodes have)")
        return fallback
    node_gb = node.mem_mb // 1024
    share = tasks / node.gpus if gpus and node.gpus else cpus * tasks / max(1, node.cpus)
    share_gb = int(node_gb * min(1.0, share))
    mem = max(share_gb, need_gb or 0)
    if mem > node_gb:
        notes.append(f"warning: the ranks need about {need_gb} GB of host memory while the model loads, more "
                     f"than the partition's smallest node has ({node_gb} GB); requesting all of it")
        mem = node_gb
    notes.append(f"mem {mem} GB per node = {min(1.0, share):.0%} of the node's {node_gb} GB"
                 + (f" (at least the {need_gb} GB the ranks need while loading)" if need_gb else ""))
    return max(1, mem)
