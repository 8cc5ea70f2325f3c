"""The rules of `distributed.sequence_parallel_size` (pure: no torch), shared by the spec check, `plan`
and the ranks, so that each rule is written once.

What each backend can do (accelerate 1.15, DeepSpeed 0.19.8, torch 2.13):
* deepspeed: Ulysses (accelerate's `ParallelismConfig(sp_size, sp_backend="deepspeed")`, DeepSpeed's
  ALST wrapper). Runs on CPU (gloo all-to-all) and GPU; sdpa or flash_attention_2 (DeepSpeed refuses
  eager). Attention heads are split over the group: heads must divide by the size, and key/value heads
  must divide by it or it by them (DeepSpeed replicates kv heads then). Packed examples stay isolated
  (train.seqpar rebuilds the examples from the gathered position_ids).
* fsdp: ring attention (accelerate's `cp_size`, torch's context parallel). GPU only: torch has no CPU
  kernel for it. It can express plain causal attention only, so packed rows would attend across
  examples: data.packing must be false.
* ddp: none.
"""

from __future__ import annotations

import math
from typing import Any

KEY = "distributed.sequence_parallel_size"
SUPPORTED = {"deepspeed": "Ulysses (CPU and GPU)", "fsdp": "ring attention (GPU only, data.packing: false)"}


def spec_errors(spec: Any) -> list[str]:
    """Errors visible from the spec alone (the world size and the model's heads are checked by
    `layout_errors`). Each message names the key."""
    S = spec.distributed.sequence_parallel_size
    if S == 1:
        return []
    d, out = spec.distributed, []
    if d.backend not in SUPPORTED:
        works = "; ".join(f"backend: {b} -> {what}" for b, what in SUPPORTED.items())
        return [f"{KEY}={S} is not supported with distributed.backend: {d.backend}, which has no sequence "
                f"parallelism; use {works}"]
    attn = spec.model.attn_implementation
    if attn == "eager":
        out.append(f"model.attn_implementation=eager cannot be used with {KEY}={S}: DeepSpeed's Ulysses and "
                   "ring attention take sdpa or flash_attention_2 (or auto)")
    if d.backend == "fsdp":
        if spec.data.packing:
            out.append(f"data.packing: true cannot be used with {KEY}={S} under distributed.backend: fsdp: ring "
                       "attention computes plain causal attention over the whole row, so packed examples would "
                       "attend to each other. Set data.packing: false, or use backend: deepspeed (Ulysses keeps "
                       "packed examples apart)")
        if attn == "flash_attention_2":
            out.append(f"model.attn_implementation=flash_attention_2 cannot be used with {KEY}={S} under "
                       "distributed.backend: fsdp: torch's ring attention runs on sdpa")
    if spec.logging.generation_steps:
        out.append(f"logging.generation_steps cannot be used with {KEY}={S}: the sample generations would "
                   "run one token at a time through the group's all-to-all; set logging.generation_steps: null")
    e = spec.train.per_device_eval_batch_size
    if e is not None and e != spec.train.per_device_train_batch_size:
        out.append(f"train.per_device_eval_batch_size={e} must equal train.per_device_train_batch_size "
                   f"({spec.train.per_device_train_batch_size}) with {KEY}={S}: DeepSpeed's Ulysses attention "
                   "is built for one batch size (leave it unset)")
    return out


def layout_errors(sp_size: int, world_size: int, heads: int | None = None,
                  kv_heads: int | None = None) -> list[str]:
    """Errors of the layout: the world must divide into groups, the heads over a group."""
    S, out = sp_size, []
    if S == 1:
        return out
    if world_size % S:
        out.append(f"{KEY}={S} does not divide the world size {world_size} (GPUs that share one sequence "
                   f"must fill whole groups); use a divisor of {world_size}, e.g. "
                   f"{', '.join(str(k) for k in divisors(world_size) if k > 1) or '1'}")
    if heads is not None and heads % S:
        out.append(f"{KEY}={S} does not divide the model's {heads} attention heads (each rank of a group "
                   f"computes attention for heads / {S} of them); use one of "
                   f"{', '.join(str(k) for k in divisors(heads) if k > 1)}")
    if kv_heads is not None and kv_heads % S and S % kv_heads:
        out.append(f"{KEY}={S} and the model's {kv_heads} key/value heads: one must divide the other")
    return out


def machine_errors(spec: Any, cuda: bool) -> list[str]:
    """What this machine cannot run (checked by the launcher and again by every rank)."""
    S, out = spec.distributed.sequence_parallel_size, []
    if S > 1 and spec.distributed.backend == "fsdp" and not cuda:
        out.append(f"{KEY}={S} with distributed.backend: fsdp needs CUDA GPUs: torch's ring attention has no "
                   "CPU kernel. On this machine use distributed.backend: deepspeed (Ulysses runs on CPU over gloo)")
    if spec.train.activation_offloading and not cuda:
        out.append("train.activation_offloading: true needs a GPU (it moves activations from GPU to CPU memory; "
                   "TRL's offloading has no CPU device to offload from); set it to false here")
    return out


def divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def padded_length(length: int, sp_size: int) -> int:
    """Rows are padded to a multiple of the group size (each rank takes an equal shard); the padding is
    never a target."""
    return -(-length // sp_size) * sp_size


def figures(sp_size: int, world_size: int, micro: int, max_length: int) -> dict[str, Any]:
    """What `plan` shows: the data-parallel degree, the tokens each GPU holds per micro-batch (at most),
    and the share of one sequence's activation memory on each GPU of its group."""
    return {"sequence_parallel_size": sp_size, "data_parallel_size": world_size // sp_size,
            "tokens_per_gpu_per_micro_batch": micro * padded_length(max_length, sp_size) // sp_size,
            "activation_share": 1.0 / sp_size}


def rope_scaled(rope: dict[str, Any] | None) -> bool:
    """Whether a rope_parameters/rope_scaling dict stretches the position range (any type but default)."""
    return bool(rope) and str(rope.get("rope_type", rope.get("type", "default"))) != "default"


def rope_factor(rope: dict[str, Any] | None) -> float:
    return float((rope or {}).get("factor") or 1.0) if rope_scaled(rope) else 1.0


def position_warning(max_length: int, max_positions: int | None, rope: dict[str, Any] | None) -> str | None:
    """`plan`'s warning when the rows are longer than the positions the model was trained for and no
    RoPE scaling stretches them. `rope` is the spec's override (model.rope_parameters): it reaches its
    original_max_position_embeddings (else the model's) x factor. A model whose own config is already
    scaled declares its reach in max_position_embeddings."""
    if not max_positions:
        return None
    base = int((rope or {}).get("original_max_position_embeddings") or max_positions)
    reach = max(max_positions, math.floor(base * rope_factor(rope)))
    if max_length <= reach:
        return None
    if rope_scaled(rope):
        return (f"data.max_length={max_length} exceeds the {base} positions x RoPE factor {rope_factor(rope):g} "
                f"= {reach} of model.rope_parameters; raise its factor")
    return (f"data.max_length={max_length} exceeds the model's {max_positions} positions "
            "(max_position_embeddings) and no RoPE scaling is set: positions beyond it were never trained. Set "
            f"model.rope_parameters, e.g. {{rope_type: yarn, factor: {math.ceil(max_length / max_positions)}, "
            f"original_max_position_embeddings: {max_positions}}}")


def model_limits(name_or_path: str, trust_remote_code: bool = False) -> dict[str, Any] | None:
    """The model config's attention heads, key/value heads and position range, read
    without the hub (None when the config is not readable here: the ranks' libraries check then)."""
    try:
        from transformers import AutoConfig
        cfg = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code, local_files_only=True)
        text = cfg.get_text_config()
    except Exception:  # noqa: BLE001 - an unreadable config only skips these checks
        return None
    heads = getattr(text, "num_attention_heads", None)
    return {"heads": heads, "kv_heads": getattr(text, "num_key_value_heads", None) or heads,
            "max_positions": getattr(text, "max_position_embeddings", None)}


def plan_checks(spec: Any, world_size: int, limits: dict[str, Any] | None) -> tuple[list[str], list[str]]:
    """(errors, warnings) of the layout and the sequence length against the model, for `plan`."""
    S = spec.distributed.sequence_parallel_size
    limits = limits or {}
    errors = layout_errors(S, world_size, limits.get("heads"), limits.get("kv_heads"))
    warnings = [w for w in [position_warning(spec.data.max_length, limits.get("max_positions"),
                                             spec.model.rope_parameters)] if w]
    d = spec.distributed
    if S > 1 and d.nodes > 1 and world_size % d.nodes == 0 and (world_size // d.nodes) % S:
        warnings.append(f"{KEY}={S} does not divide the {world_size // d.nodes} GPUs of a node: some groups span "
                        "two nodes, and their all-to-all (two per layer) crosses the network")
    return errors, warnings
