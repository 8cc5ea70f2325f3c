"""Pure planning functions: world size, batch arithmetic, steps and warmup.

The one rule: global batch = per_device_train_batch_size × gradient_accumulation_steps × world_size,
exactly. When the user gives `global_batch_size`, accumulation is derived from the world size — so the
same spec keeps its global batch on any GPU count, or fails before anything starts.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .spec import RunSpec, SpecError


@dataclass(frozen=True)
class Batch:
    world_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int


def valid_global_batches(micro: int, world: int, near: int, count: int = 2) -> list[int]:
    """The multiples of micro × world closest to `near` (below and above), for error messages."""
    unit = micro * world
    below = (near // unit) * unit
    out = [b for b in (below, below + unit) if b > 0]
    if count > 2:
        out += [below + unit * k for k in range(2, count)]
    return out


def resolve_batch(micro: int, world: int, accum: int | None = None, global_batch: int | None = None) -> Batch:
    if world < 1 or micro < 1:
        raise SpecError(f"world size {world} and per_device_train_batch_size {micro} must be >= 1")
    if accum is not None and global_batch is not None:
        raise SpecError("set at most one of train.gradient_accumulation_steps and train.global_batch_size")
    if global_batch is None:
        accum = accum or 1
        return Batch(world, micro, accum, micro * accum * world)
    unit = micro * world
    if global_batch % unit:
        near = ", ".join(str(b) for b in valid_global_batches(micro, world, global_batch))
        raise SpecError(
            f"train.global_batch_size={global_batch} is not divisible by "
            f"train.per_device_train_batch_size ({micro}) × world size ({world} GPUs) = {unit}, "
            f"so train.gradient_accumulation_steps cannot be derived; nearest valid global batch "
            f"sizes: {near} (or change per_device_train_batch_size / the GPU count)")
    return Batch(world, micro, global_batch // unit, global_batch)


def batch_for(spec: RunSpec, world_size: int | None = None) -> Batch:
    world = world_size or spec.distributed.nodes * spec.distributed.gpus_per_node
    t = spec.train
    return resolve_batch(t.per_device_train_batch_size, world, t.gradient_accumulation_steps, t.global_batch_size)


def pin_global_batch(spec: RunSpec) -> RunSpec:
    """Resolved spec for run.yaml: record the global batch, not the accumulation, so that a resume on
    another GPU count re-derives accumulation and keeps the global batch the user planned."""
    b = batch_for(spec)
    out = spec.model_copy(deep=True)
    out.train.gradient_accumulation_steps = None
    out.train.global_batch_size = b.global_batch_size
    return out


def steps(num_rows: int, global_batch: int, epochs: float, max_steps: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps). Each step takes a full global batch; a partial last batch is
    dropped so every rank takes the same number of steps."""
    per_epoch = num_rows // global_batch
    if per_epoch == 0:  # with max_steps too: no step could take a full global batch
        raise SpecError(f"the training data has {num_rows} rows (after packing), fewer than one global "
                        f"batch of {global_batch}: lower train.global_batch_size / "
                        "per_device_train_batch_size, or add data")
    if max_steps > 0:
        return per_epoch, max_steps
    return per_epoch, max(1, math.ceil(per_epoch * epochs))


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)


@dataclass
class Plan:
    nodes: int
    gpus_per_node: int
    world_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    backend: str
    zero_stage: int
    learning_rate: float
    num_examples: int | None = None
    num_tokens: int | None = None
    num_loss_tokens: int | None = None
    num_packed_rows: int | None = None
    packing_efficiency: float | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    warmup_steps: int | None = None
    tokens_per_step: float | None = None
    memory_gb_per_gpu: dict[str, float] = field(default_factory=dict)
    num_parameters: int | None = None
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(spec: RunSpec, data_stats: dict[str, Any] | None = None) -> Plan:
    b = batch_for(spec)
    d = spec.distributed
    plan = Plan(nodes=d.nodes, gpus_per_node=d.gpus_per_node, world_size=b.world_size,
                per_device_train_batch_size=b.per_device_train_batch_size,
                gradient_accumulation_steps=b.gradient_accumulation_steps,
                global_batch_size=b.global_batch_size, backend=d.backend, zero_stage=d.stage,
                learning_rate=float(spec.train.learning_rate or 0.0))
    if spec.train.max_steps > 0:
        plan.total_steps = spec.train.max_steps
        plan.warmup_steps = warmup_steps(plan.total_steps, spec.train.warmup_ratio)
    if data_stats:
        rows = int(data_stats["num_rows"])
        plan.num_examples = int(data_stats["num_examples"])
        plan.num_tokens = int(data_stats["num_tokens"])
        plan.num_loss_tokens = int(data_stats.get("num_loss_tokens", 0)) or None
        plan.num_packed_rows = rows
        plan.packing_efficiency = float(data_stats["packing_efficiency"])
        plan.steps_per_epoch, plan.total_steps = steps(rows, b.global_batch_size,
                                                       spec.train.num_train_epochs, spec.train.max_steps)
        plan.warmup_steps = warmup_steps(plan.total_steps, spec.train.warmup_ratio)
        plan.tokens_per_step = plan.num_tokens / rows * b.global_batch_size if rows else None
    plan.warnings = hyperparameter_warnings(spec, plan)
    return plan


def hyperparameter_warnings(spec: RunSpec, plan: Plan, num_parameters: int | None = None) -> list[str]:
    """Hints, never failures: values far outside what usually works for SFT."""
    t, w = spec.train, []
    lr = float(t.learning_rate or 0.0)
    lora = spec.peft.method != "none"
    lo, hi = (1e-5, 1e-3) if lora else (1e-6, 1e-4)
    if num_parameters and not lora and num_parameters > 30e9:
        hi = 2e-5
    if lr and not lo / 10 <= lr <= hi * 10:
        w.append(f"train.learning_rate={lr:g} is far outside the usual SFT range {lo:g}–{hi:g} "
                 f"for {'LoRA' if lora else 'full fine-tuning'}")
    if t.warmup_ratio > 0.3:
        w.append(f"train.warmup_ratio={t.warmup_ratio} is long; SFT usually warms up over 1–10% of steps")
    if t.weight_decay > 0.3:
        w.append(f"train.weight_decay={t.weight_decay} is unusually high for SFT (typical 0–0.1)")
    if t.max_grad_norm == 0:
        w.append("train.max_grad_norm=0 disables gradient clipping; 1.0 is the usual SFT setting")
    if plan.global_batch_size > 2048:
        w.append(f"global batch {plan.global_batch_size} is very large for SFT (typical 16–512)")
    if plan.total_steps is not None and plan.total_steps < 10:
        w.append(f"only {plan.total_steps} optimizer steps: the schedule (warmup, decay) barely applies")
    if lora and spec.peft.r > 256:
        w.append(f"peft.r={spec.peft.r} is unusually large for LoRA (typical 8–128)")
    if plan.num_tokens and plan.num_examples and plan.num_tokens / plan.num_examples < 4:
        w.append("examples average fewer than 4 tokens: check data.format and the column names")
    return w
