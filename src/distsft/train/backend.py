"""Backend settings every rank needs: the precision, the DeepSpeed config and the collective timeout.
Pure functions of the spec (no torch at import): the launcher renders deepspeed.json from them and the
ranks build the same dict, so the file on disk and what runs cannot differ."""

from __future__ import annotations

from typing import Any, Literal

from distsft.config.spec import RunSpec
from distsft.plan.batch import Batch

Precision = Literal["bf16", "fp16", "no"]

# Fixed communication sizes instead of HF's hidden-size-derived "auto": 2e8-element buckets are the HF
# template values for ZeRO-1/2 (DeepSpeed's docs: with overlap_comm the two buckets take 4.5× their size
# at 2 bytes each, ~9 GB for its default 5e8, ~3.6 GB here); the ZeRO-3 values are DeepSpeed's defaults.
ZERO12_BUCKET = 200_000_000
ZERO3_REDUCE_BUCKET = 500_000_000
ZERO3_PREFETCH_BUCKET = 50_000_000
ZERO3_PERSISTENCE_THRESHOLD = 100_000
ZERO3_MAX_LIVE = 1_000_000_000

def resolve_precision(spec: RunSpec, cuda: bool, bf16_supported: bool) -> Precision:
    """train.bf16 None means bf16 where a GPU supports it and fp32 elsewhere; explicit values win
    (torch runs bf16 on CPU, so an explicit bf16 is honoured there too)."""
    t = spec.train
    if t.fp16:
        return "fp16"
    if t.bf16 is None:
        return "bf16" if cuda and bf16_supported else "no"
    return "bf16" if t.bf16 else "no"


def render_deepspeed(spec: RunSpec, batch: Batch, precision: str) -> dict[str, Any]:
    d = spec.distributed
    stage = d.stage
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        zero.update(overlap_comm=True, contiguous_gradients=True, allgather_partitions=True,
                    allgather_bucket_size=ZERO12_BUCKET, reduce_scatter=True, reduce_bucket_size=ZERO12_BUCKET)
    elif stage == 3:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=ZERO3_REDUCE_BUCKET,
                    stage3_prefetch_bucket_size=ZERO3_PREFETCH_BUCKET,
                    stage3_param_persistence_threshold=ZERO3_PERSISTENCE_THRESHOLD,
                    stage3_max_live_parameters=ZERO3_MAX_LIVE, stage3_max_reuse_distance=ZERO3_MAX_LIVE,
                    sub_group_size=ZERO3_MAX_LIVE,
                    # HF save_model then writes one consolidated 16-bit state dict, not ZeRO shards only.
                    stage3_gather_16bit_weights_on_model_save=True)
    if d.offload_optimizer:
        # HF Trainer's torch AdamW is swapped by accelerate for DeepSpeedCPUAdam (a JIT-built op) here;
        # zero_force_ds_cpu_optimizer stays at its default so that swap, the fast path, happens.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    fp16: dict[str, Any] = {"enabled": precision == "fp16"}
    if precision == "fp16":
        # Dynamic loss scaling (loss_scale 0) starting at 2^16, halving after 2 overflowing steps.
        fp16.update(loss_scale=0, initial_scale_power=16, loss_scale_window=1000, hysteresis=2, min_loss_scale=1)
    cfg: dict[str, Any] = {
        "train_batch_size": batch.global_batch_size,
        "train_micro_batch_size_per_gpu": batch.per_device_train_batch_size,
        "gradient_accumulation_steps": batch.gradient_accumulation_steps,
        "gradient_clipping": float(spec.train.max_grad_norm),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": fp16,
        "zero_optimization": zero,
        "steps_per_print": 1_000_000,  # HF Trainer logs; DeepSpeed's own step prints would duplicate it
        "wall_clock_breakdown": False,
    }
    if batch.sequence_parallel_size > 1:
        # HF checks train_batch_size against world x micro x accum, counting every GPU of a sequence-
        # parallel group as a replica; accelerate sets it to micro x accum x data-parallel degree (the
        # global batch above) itself before DeepSpeed starts, so it is left out here.
        del cfg["train_batch_size"]
    if precision == "bf16":
        cfg.update(fp32_reduction())
    return cfg


def fp32_reduction() -> dict[str, Any]:
    """Under bf16 DeepSpeed reduces gradients in the model dtype (`engine.communication_data_type`
    falls back to bf16) and accumulates them over micro-batches in it (`data_types.grad_accum_dtype`
    defaults to the model dtype): with 8 bits of mantissa, sums over many ranks and micro-batches lose
    the small contributions. DeepSpeed 0.19 takes fp32 for both: the reduce-scatter/all-reduce runs in
    fp32 (ZeRO-1/2/3 accept it), and ZeRO keeps a separate fp32 accumulation buffer (ZeRO-1 through its
    BF16_Optimizer). fp16 keeps DeepSpeed's defaults: its loss scaling is built around them."""
    return {"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}}


def process_group_timeout_s(spec: RunSpec) -> int:
    """distributed.timeout_minutes in seconds: the ranks pass it as TrainingArguments.ddp_timeout, which
    accelerate gives to torch's init_process_group (DDP) and to deepspeed.init_distributed (DeepSpeed);
    train.recipe gives it to its own deepspeed.init_distributed call too. No data build runs inside it."""
    return int(spec.distributed.timeout_minutes) * 60


