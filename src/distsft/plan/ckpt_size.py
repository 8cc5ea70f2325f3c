"""Size of one intermediate checkpoint per rank and per node, for each backend (an estimate for the plan).

What each backend writes at a save (T trainable parameters, N all parameters, W ranks, G per node;
Adam keeps two fp32 moments, 8 bytes per trainable parameter):

* ddp: rank 0 writes the model (all weights for full fine-tuning, the adapter for LoRA, in the weights'
  dtype) and the whole optimizer state (optimizer.pt); the other ranks only their RNG state.
* ZeRO-1/2: rank 0 writes the consolidated 16-bit model (HF's model.safetensors) and DeepSpeed's 16-bit
  module states; every rank writes its partition of the fp32 master weights and moments (12 T / W).
* ZeRO-3 (intermediate saves are sharded only, see saves.py): every rank writes its partition of the fp32
  master weights and moments, 12 T / W; nothing is gathered.
* fsdp: torch DCP shards: every rank writes its shard of the fp32 weights (the adapter for LoRA) and of
  the moments, 12 T / W.

The node holding rank 0 is the largest under ddp and ZeRO-1/2; under ZeRO-3 and FSDP2 every node writes
the same G / W of the checkpoint. The final model (consolidated once, at the end) is not included.
"""

from __future__ import annotations

from typing import Any

GIB = 2**30
ADAM_BYTES = 8
MASTER_BYTES = 4
HALF_BYTES = 2


def checkpoint_bytes(backend: str, trainable: int, weights_bytes: float, world: int, per_node: int) -> tuple[int, int]:
    """(bytes written by the largest rank, bytes written by the largest node) for one checkpoint.
    backend: ddp | zero1 | zero2 | zero3 | fsdp; weights_bytes: bytes per trainable weight under DDP."""
    sharded = (MASTER_BYTES + ADAM_BYTES) * trainable / world
    if backend == "ddp":
        rank0 = (weights_bytes + ADAM_BYTES) * trainable
        return int(rank0), int(rank0)
    if backend in ("zero1", "zero2"):
        rank0 = 2 * HALF_BYTES * trainable + sharded  # model.safetensors + DeepSpeed's module states
        return int(rank0), int(2 * HALF_BYTES * trainable + sharded * per_node)
    if backend in ("zero3", "fsdp"):
        return int(sharded), int(sharded * per_node)
    raise ValueError(f"unknown backend {backend!r}")


def spec_label(spec: Any) -> str:
    d = spec.distributed
    if d.backend == "deepspeed":
        return f"zero{max(1, d.stage)}" if d.stage else "ddp"  # ZeRO-0 saves like DDP (no partitions)
    return d.backend


def estimate(spec: Any, trainable: int, world: int) -> dict[str, Any]:
    """GiB per checkpoint, largest rank and largest node, for every backend and for the spec's own."""
    nodes = spec.distributed.nodes if world % spec.distributed.nodes == 0 else 1
    per_node = world // nodes
    full_fp32 = spec.peft.method == "none" and spec.model.torch_dtype in ("auto", "float32")
    weights = MASTER_BYTES if full_fp32 or spec.peft.method != "none" else HALF_BYTES
    table = {}
    for backend in ("ddp", "zero2", "zero3", "fsdp"):
        rank, node = checkpoint_bytes(backend, trainable, weights, world, per_node)
        table[backend] = {"per_rank_gb": round(rank / GIB, 3), "per_node_gb": round(node / GIB, 3)}
    own = spec_label(spec)
    if own not in table:
        rank, node = checkpoint_bytes(own, trainable, weights, world, per_node)
        table[own] = {"per_rank_gb": round(rank / GIB, 3), "per_node_gb": round(node / GIB, 3)}
    return {"backend": own, **table[own], "per_backend": table}
