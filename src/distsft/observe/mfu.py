"""Model FLOPs utilisation, logged as `mfu` in metrics.jsonl on CUDA.

    mfu = training FLOPs per token × real tokens/s (all ranks) / (world size × peak FLOP/s of one device)

Training FLOPs per token follow the 6N convention, made trainable-aware: the forward pass costs 2N
(N = parameters doing matmuls: everything but the input embedding lookup), the backward pass 2N for
the activation gradients (needed through frozen layers too) plus 2 per *trainable* parameter for the
weight gradients. Full fine-tuning: 6N; LoRA: ≈ 4N. For a mixture of experts N counts the routed experts
at num_experts_per_tok / num_experts (the active parameters). Attention's own FLOPs and recomputation under
activation checkpointing are not counted (the usual MFU, not HFU). The peak is the device's dense
bf16/fp16 tensor-core rate, looked up by its name (`logging.peak_tflops` overrides); an unknown device
without the override logs no mfu (and says so once). An fp32 run (train.bf16: false) is measured
against the fp32 peak instead: the TF32 tensor-core rate on Ampere and newer (distsft turns TF32 on;
half the bf16 rate on these parts), the plain fp32 rate on parts without TF32 (V100, T4, MI250).
"""

from __future__ import annotations

import math
from typing import Any, Callable

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s. Longest names first: "H100 PCIe" before "H100".
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0), ("B200", 2250.0), ("B100", 1750.0), ("H200", 989.0), ("GH200", 989.0),
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H800", 989.0), ("H20", 148.0),
    ("A100", 312.0), ("A800", 312.0), ("A10G", 70.0), ("A10", 125.0), ("A30", 165.0), ("A40", 150.0),
    ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0), ("RTX 6000 Ada", 364.0), ("RTX A6000", 155.0),
    ("RTX 4090", 165.0), ("RTX 3090", 71.0), ("V100", 125.0), ("T4", 65.0),
    ("MI300X", 1307.0), ("MI325X", 1307.0), ("MI250X", 383.0), ("MI250", 362.0),
)


# fp32 matmul peak where it is not half the bf16 one: no TF32 (V100, T4), or a 1:4 ratio (MI250).
FP32_TFLOPS: tuple[tuple[str, float], ...] = (("V100", 15.7), ("T4", 8.1), ("MI250X", 95.7), ("MI250", 90.5))


def _lookup(table: tuple[tuple[str, float], ...], device_name: str) -> float | None:
    name = device_name.upper()
    for key, value in sorted(table, key=lambda kv: -len(kv[0])):
        if key.upper() in name:
            return value
    return None


def peak_tflops(device_name: str, override: float | None = None, precision: str = "bf16") -> float | None:
    """Peak dense TFLOP/s of one device for the run's precision ("bf16"/"fp16", or "no" for fp32), by (a
    substring of) its name; `override` wins."""
    if override:
        return float(override)
    bf16 = _lookup(PEAK_TFLOPS, device_name)
    if precision not in ("no", "fp32") or bf16 is None:
        return bf16
    fp32 = _lookup(FP32_TFLOPS, device_name)
    return fp32 if fp32 is not None else bf16 / 2


def _numel(p: Any) -> int:
    # ZeRO-3 partitions a parameter (ds_numel is its full size); bitsandbytes stores 4-bit weights
    # packed, two values a byte (the real shape is in quant_state).
    if hasattr(p, "ds_numel"):
        return int(p.ds_numel)
    shape = getattr(getattr(p, "quant_state", None), "shape", None)
    return int(math.prod(shape)) if shape is not None else p.numel()


def count_parameters(model: Any) -> tuple[int, int]:
    """(matmul parameters, trainable parameters) one token runs through. Embedding tables are lookups,
    not matmuls; an output head tied to the input embedding still multiplies with it, so then it counts
    (once). A mixture of experts counts num_experts_per_tok / num_experts of its routed experts (their
    adapters too): the active parameters, not the ~10x larger total of e.g. Qwen3-30B-A3B."""
    import torch
    from distsft.config.moe import is_expert_parameter, moe_of
    layout = moe_of(getattr(model, "config", None))
    active = layout.active_fraction if layout else 1.0
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    seen: set[int] = set()
    total = trainable = 0.0
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _numel(p) * (active if layout and is_expert_parameter(name) else 1.0)
        if p.requires_grad:
            trainable += n
        if id(p) in lookups and p is not head_weight:
            continue
        total += n
    return int(round(total)), int(round(trainable))


def flops_per_token(matmul_params: int, trainable_params: int) -> float:
    """Forward 2N + backward 2N (activation gradients) + 2 × trainable (weight gradients)."""
    return 4.0 * matmul_params + 2.0 * trainable_params


def mfu(tokens_per_second: float, fpt: float, world_size: int, peak_tflops_per_device: float) -> float:
    return fpt * tokens_per_second / (world_size * peak_tflops_per_device * 1e12)


def meter(model: Any, world_size: int, device: Any, override: float | None = None,
          warn: Callable[[str], None] | None = None, precision: str = "bf16") -> Callable[[float], float] | None:
    """tokens/s → mfu for this model on this device at this precision, or None on CPU / an unknown device."""
    if getattr(device, "type", str(device)) != "cuda":
        return None
    import torch
    name = torch.cuda.get_device_name(device)
    peak = peak_tflops(name, override, precision)
    if peak is None:
        if warn:
            warn(f"mfu not logged: the peak FLOP/s of {name!r} is not known; set logging.peak_tflops")
        return None
    fpt = flops_per_token(*count_parameters(model))
    return lambda tps: mfu(tps, fpt, world_size, peak)
