"""`per_device_train_batch_size: auto` on a GPU: one forward/backward on the longest packed row confirms
the micro-batch the memory estimate chose (plan.fit), halving on out-of-memory, before training starts.

The estimate leaves out the CUDA context, allocator fragmentation and kernels' workspaces; the probe
measures the real thing once. Halving keeps the global batch exact: the next micro-batch is the largest
candidate (a divisor of global batch / data-parallel GPUs) at most half the one that failed, so
gradient accumulation is re-derived as an integer. Every rank probes and all take the smallest result
(ranks may hold different shards), and rank 0 records it in run.yaml so that a resume uses the same.

On CPU there is nothing to probe (host memory pages out rather than failing): the estimate stands.
HF's `auto_find_batch_size` is not used: it changes the global batch and is refused under DeepSpeed and
FSDP (transformers #29058).
"""

from __future__ import annotations

from typing import Any, Callable

from distsft.errors import SpecError


def is_oom(exc: BaseException) -> bool:
    """CUDA's out-of-memory, as torch raises it (and as some kernels re-raise it as RuntimeError)."""
    import torch
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def probe(step: Callable[[int], None], micro: int, candidates: list[int],
          on_oom: Callable[[], None] | None = None, oom: Callable[[BaseException], bool] = is_oom) -> int:
    """The largest micro-batch from `micro` down through `candidates` for which `step(micro)` (one
    forward/backward) runs; each out-of-memory halves it. SpecError when even the smallest fails."""
    tried = []
    while True:
        try:
            step(micro)
            return micro
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raises
            if not oom(exc):
                raise
            tried.append(micro)
            if on_oom is not None:
                on_oom()
            smaller = [m for m in candidates if m <= micro // 2]
            if not smaller:
                raise SpecError(f"train.per_device_train_batch_size: auto: out of GPU memory even at a micro-batch "
                                f"of {micro} (tried {', '.join(map(str, tried))}); use gradient checkpointing, "
                                "ZeRO-3/FSDP2, LoRA/QLoRA or a shorter data.max_length") from None
            micro = max(smaller)


def longest_row(dataset: Any) -> dict[str, Any]:
    """The packed row with the most real tokens (the costliest one training will see)."""
    best, best_len = None, -1
    for i in range(len(dataset)):
        row = dataset[i]
        n = len(row["input_ids"])
        if n > best_len:
            best, best_len = row, n
    if best is None:
        raise SpecError("train.per_device_train_batch_size: auto: the training data has no rows to probe with")
    return best


def forward_backward(model: Any, collate: Callable[[list[dict[str, Any]]], dict[str, Any]], row: dict[str, Any],
                     device: Any) -> Callable[[int], None]:
    """A step function for `probe`: `micro` copies of `row`, one forward and backward, then the
    gradients and cached blocks are released so training starts from a clean allocator."""
    import torch

    def step(micro: int) -> None:
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate([row] * micro).items()}
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids", "attention_mask")}
        try:
            with torch.autocast(device_type=getattr(device, "type", str(device)), dtype=torch.bfloat16):
                out = model(**batch)
            out.loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return step


def release() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
