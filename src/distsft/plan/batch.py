"""Batch arithmetic, steps and warmup: pure functions of the spec and the world size.

The one rule: global batch = per_device_train_batch_size × gradient_accumulation_steps × data-parallel
degree, exactly, where the data-parallel degree is world_size / distributed.sequence_parallel_size (the
GPUs of a sequence-parallel group share each micro-batch). When the user gives `global_batch_size`, accumulation is derived from the world size — so the
same spec keeps its global batch on any GPU count, or fails before anything starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from distsft.config.seqpar import layout_errors
from distsft.config.spec import RunSpec
from distsft.errors import SpecError


@dataclass(frozen=True)
class Batch:
    world_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    sequence_parallel_size: int = 1

    @property
    def data_parallel_size(self) -> int:
        return self.world_size // self.sequence_parallel_size


def valid_global_batches(micro: int, world: int, near: int, count: int = 2) -> list[int]:
    """The multiples of micro × world closest to `near` (below and above), for error messages."""
    unit = micro * world
    below = (near // unit) * unit
    out = [b for b in (below, below + unit) if b > 0]
    if count > 2:
        out += [below + unit * k for k in range(2, count)]
    return out


def resolve_batch(micro: int, world: int, accum: int | None = None, global_batch: int | None = None,
                  sp: int = 1) -> Batch:
    if world < 1 or micro < 1:
        raise SpecError(f"world size {world} and per_device_train_batch_size {micro} must be >= 1")
    if accum is not None and global_batch is not None:
        raise SpecError("set at most one of train.gradient_accumulation_steps and train.global_batch_size")
    for error in layout_errors(sp, world):
        raise SpecError(error)
    dp = world // sp
    if global_batch is None:
        accum = accum or 1
        return Batch(world, micro, accum, micro * accum * dp, sp)
    unit = micro * dp
    if global_batch % unit:
        near = ", ".join(str(b) for b in valid_global_batches(micro, dp, global_batch))
        replicas = f"world size ({world} GPUs)" if sp == 1 else \
            f"data-parallel degree ({world} GPUs / sequence_parallel_size {sp})"
        raise SpecError(
            f"train.global_batch_size={global_batch} is not divisible by "
            f"train.per_device_train_batch_size ({micro}) × {replicas} = {unit}, "
            f"so train.gradient_accumulation_steps cannot be derived; nearest valid global batch "
            f"sizes: {near} (or change per_device_train_batch_size / the GPU count)")
    return Batch(world, micro, global_batch // unit, global_batch, sp)


def batch_for(spec: RunSpec, world_size: int | None = None) -> Batch:
    world = world_size or spec.distributed.nodes * spec.distributed.gpus_per_node
    t = spec.train
    micro = t.per_device_train_batch_size
    if micro == "auto":  # the largest that fits, from the memory estimate (plan.fit)
        from distsft.plan.fit import auto_micro
        micro = auto_micro(spec, world)
    return resolve_batch(micro, world, t.gradient_accumulation_steps, t.global_batch_size,
                         spec.distributed.sequence_parallel_size)


def pin_global_batch(spec: RunSpec) -> RunSpec:
    """Resolved spec for run.yaml: record the global batch, not the accumulation, so that a resume on
    another GPU count re-derives accumulation and keeps the global batch the user planned."""
    b = batch_for(spec)
    out = spec.model_copy(deep=True)
    out.train.gradient_accumulation_steps = None
    out.train.global_batch_size = b.global_batch_size
    out.train.per_device_train_batch_size = b.per_device_train_batch_size  # `auto` as resolved, for a resume
    return out


def steps(num_rows: int, global_batch: int, epochs: float, max_steps: int, why: str = "") -> tuple[int, int]:
    """(steps_per_epoch, total_steps). Each step takes a full global batch; a partial last batch is
    dropped so every rank takes the same number of steps. `why`: the build's drops, when too few rows
    are left (stats["drops_explained"])."""
    per_epoch = num_rows // global_batch
    if per_epoch == 0:  # with max_steps too: no step could take a full global batch
        raise SpecError(f"the training data has {num_rows} rows (after packing), fewer than one global "
                        f"batch of {global_batch}{why}: lower train.global_batch_size / "
                        "per_device_train_batch_size, or add data")
    if max_steps > 0:
        return per_epoch, max_steps
    return per_epoch, max(1, math.ceil(per_epoch * epochs))


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    return math.ceil(total_steps * warmup_ratio)
