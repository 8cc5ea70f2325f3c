"""What fits on the GPUs: the backend, activation checkpointing, offload and micro-batch that `distsft init`
writes, and the micro-batch `train.per_device_train_batch_size: auto` resolves to. Both read the one
memory estimate (plan.memory.estimate) and keep a margin for what it leaves out (the CUDA context,
allocator fragmentation, communication buffers).

`auto` keeps the global batch exact: only micro-batches that divide global_batch_size / data-parallel
GPUs are candidates, so gradient_accumulation_steps is re-derived as an integer (plan.batch's rule).
When nothing fits, the message names what would (checkpointing, ZeRO-3, FSDP2, offload, LoRA/QLoRA,
fewer tokens per micro-batch), each checked against the same estimate.

Pure: the model is a plan.memory.ModelShape; no torch here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from distsft.errors import SpecError
from distsft.plan import memory

# Share of the GPU the estimate may fill, and what is kept back whatever the size (CUDA context, NCCL
# buffers, the allocator's cached blocks): 80 GB -> 70 GB usable, 24 GB -> 19.6 GB.
MARGIN = 0.9
RESERVED_GB = 2.0
# The ladders init walks, fastest first: (label in memory.STAGES, gradient checkpointing). Sharding and
# checkpointing cost time, so each rung adds the least that buys memory: DDP, then ZeRO-2 (same
# traffic as DDP's all-reduce), checkpointing, ZeRO-3, then CPU offload.
FULL_LADDER = (("ddp", False), ("zero2", False), ("ddp", True), ("zero2", True), ("zero3", False),
               ("zero3", True), ("zero3+offload_opt", True), ("zero3+offload_all", True))
# LoRA/QLoRA: frozen base weights dominate; FSDP2 shards them (QLoRA's 4-bit storage too).
ADAPTER_LADDER = (("ddp", False), ("ddp", True), ("fsdp", False), ("fsdp", True), ("fsdp+offload", True))
LABEL_SETTINGS: dict[str, dict[str, Any]] = {
    "ddp": {"backend": "ddp", "zero_stage": None, "offload_optimizer": False, "offload_params": False},
    "zero2": {"backend": "deepspeed", "zero_stage": 2, "offload_optimizer": False, "offload_params": False},
    "zero3": {"backend": "deepspeed", "zero_stage": 3, "offload_optimizer": False, "offload_params": False},
    "zero3+offload_opt": {"backend": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": False},
    "zero3+offload_all": {"backend": "deepspeed", "zero_stage": 3, "offload_optimizer": True, "offload_params": True},
    "fsdp": {"backend": "fsdp", "zero_stage": None, "offload_optimizer": False, "offload_params": False},
    "fsdp+offload": {"backend": "fsdp", "zero_stage": None, "offload_optimizer": False, "offload_params": True},
}


def usable_gb(gpu_memory_gb: float) -> float:
    return gpu_memory_gb * MARGIN - RESERVED_GB


def spec_label(spec: Any) -> str:
    """The memory.STAGES label of the spec's own backend choice."""
    d = spec.distributed
    if d.backend == "ddp":
        return "ddp"
    if d.backend == "fsdp":
        return "fsdp+offload" if d.offload_params else "fsdp"
    label = f"zero{d.stage}" if d.stage else "ddp"
    if d.offload_params:
        return label + "+offload_all"
    return label + "+offload_opt" if d.offload_optimizer else label


def dp_world(spec: Any) -> int:
    d = spec.distributed
    return d.nodes * d.gpus_per_node // max(1, getattr(d, "sequence_parallel_size", 1) or 1)


def _variant(spec: Any, micro: int, checkpointing: bool, **data: Any) -> Any:
    train = spec.train.model_copy(update={"per_device_train_batch_size": micro,
                                          "gradient_checkpointing": checkpointing})
    update: dict[str, Any] = {"train": train}
    if data:
        update["data"] = spec.data.model_copy(update=data)
    return spec.model_copy(update=update)


def gb_for(spec: Any, shape: memory.ModelShape, label: str, micro: int, checkpointing: bool, **data: Any) -> float:
    """Estimated GiB per GPU for one backend label at this micro-batch and checkpointing choice."""
    est = memory.estimate(_variant(spec, micro, checkpointing, **data), shape=shape)
    return float(est["per_stage_gb"][label])


def micro_candidates(global_batch: int, dp: int) -> list[int]:
    """Micro-batches that keep `global_batch` exact on `dp` data-parallel GPUs, largest first."""
    share = global_batch // dp if global_batch % dp == 0 else 0
    return [m for m in range(share, 0, -1) if share % m == 0]


def largest_micro(spec: Any, shape: memory.ModelShape, label: str, checkpointing: bool, budget_gb: float,
                  candidates: list[int]) -> tuple[int, float] | None:
    """(micro, GiB) for the largest candidate that fits `budget_gb`; memory grows with the micro-batch,
    so the candidates are searched by bisection over the sorted list."""
    ordered = sorted(candidates)
    lo, hi, best = 0, len(ordered) - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        gb = gb_for(spec, shape, label, ordered[mid], checkpointing)
        if gb <= budget_gb:
            best, lo = (ordered[mid], gb), mid + 1
        else:
            hi = mid - 1
    return best


@dataclass(frozen=True)
class Fit:
    label: str                 # memory.STAGES label
    gradient_checkpointing: bool
    micro: int
    estimate_gb: float
    budget_gb: float           # usable GiB per GPU (after the margin)
    gpu_memory_gb: float

    @property
    def settings(self) -> dict[str, Any]:
        return dict(LABEL_SETTINGS[self.label])

    def why(self) -> str:
        return (f"~{self.estimate_gb:.1f} GB per GPU estimated of {self.budget_gb:.1f} GB usable "
                f"({self.gpu_memory_gb:g} GB x {MARGIN} - {RESERVED_GB:g} GB kept back)")


def ladder(method: str, world: int) -> tuple[tuple[str, bool], ...]:
    rungs = ADAPTER_LADDER if method in ("lora", "qlora") else FULL_LADDER
    if world == 1:  # sharding across one GPU saves nothing; only checkpointing and offload do
        rungs = tuple(r for r in rungs if r[0] in ("ddp",) or "offload" in r[0])
    return rungs


def choose_backend(spec: Any, shape: memory.ModelShape, gpu_memory_gb: float) -> Fit:
    """The first rung of the ladder on which a micro-batch of one fits; SpecError naming what would
    when none does."""
    budget = usable_gb(gpu_memory_gb)
    world = spec.distributed.nodes * spec.distributed.gpus_per_node
    for label, ckpt in ladder(spec.peft.method, world):
        gb = gb_for(spec, shape, label, 1, ckpt)
        if gb <= budget:
            return Fit(label, ckpt, 1, gb, budget, gpu_memory_gb)
    raise SpecError(nothing_fits(spec, shape, gpu_memory_gb, every_backend=True))


def resolve_micro(spec: Any, shape: memory.ModelShape, gpu_memory_gb: float, global_batch: int) -> Fit:
    """`per_device_train_batch_size: auto` for the spec's own backend and checkpointing: the largest
    micro-batch that fits with the margin and keeps `global_batch` exact."""
    label = spec_label(spec)
    dp = dp_world(spec)
    candidates = micro_candidates(global_batch, dp)
    if not candidates:
        raise SpecError(f"train.global_batch_size={global_batch} is not divisible by the {dp} data-parallel "
                        "GPUs, so no micro-batch keeps it exact")
    budget = usable_gb(gpu_memory_gb)
    found = largest_micro(spec, shape, label, spec.train.gradient_checkpointing, budget, candidates)
    if found is None:
        raise SpecError(nothing_fits(spec, shape, gpu_memory_gb))
    return Fit(label, spec.train.gradient_checkpointing, found[0], found[1], budget, gpu_memory_gb)


def nothing_fits(spec: Any, shape: memory.ModelShape, gpu_memory_gb: float, every_backend: bool = False) -> str:
    """Exit-2 text: even a micro-batch of one does not fit; which changes would (each estimated)."""
    budget = usable_gb(gpu_memory_gb)
    label, ckpt = spec_label(spec), spec.train.gradient_checkpointing
    world = spec.distributed.nodes * spec.distributed.gpus_per_node
    own = (min(gb_for(spec, shape, lab, 1, c) for lab, c in ladder(spec.peft.method, world)) if every_backend
           else gb_for(spec, shape, label, 1, ckpt))
    options: list[str] = []
    if not ckpt and gb_for(spec, shape, label, 1, True) <= budget:
        options.append("train.gradient_checkpointing: true")
    for other, text in (("zero3", "distributed.backend: deepspeed with zero_stage: 3"),
                        ("fsdp", "distributed.backend: fsdp (FSDP2)"),
                        ("zero3+offload_all", "ZeRO-3 with offload_optimizer and offload_params"),
                        ("fsdp+offload", "FSDP2 with offload_params")):
        if other != label and gb_for(spec, shape, other, 1, True) <= budget:
            options.append(text + " (with checkpointing)")
    lighter = {"none": ("lora", "qlora"), "lora": ("qlora",)}.get(spec.peft.method, ())
    for method in lighter:
        alt = spec.model_copy(update={"peft": spec.peft.model_copy(update={"method": method})})
        if min(gb_for(alt, shape, lab, 1, True) for lab in ("ddp", "fsdp")) <= budget:
            options.append(f"peft.method: {method}")
    shorter = spec.data.max_length // 2
    if shorter >= 8 and gb_for(spec, shape, label, 1, True, max_length=shorter) <= budget:
        options.append(f"fewer tokens per micro-batch (data.max_length: {shorter}, with checkpointing)")
    where = "on the best backend distsft offers" if every_backend else f"with {label}"
    head = (f"the model does not fit: one micro-batch of {spec.data.max_length} tokens {where} is estimated at "
            f"~{own:.1f} GB per GPU, over the {budget:.1f} GB usable of {gpu_memory_gb:g} GB")
    if not options:
        return head + "; nothing distsft offers fits on GPUs this size: use more GPUs or larger ones"
    return head + "; what would fit: " + "; ".join(options)


def memory_budget(spec: Any) -> tuple[float, str]:
    """(GiB per device, where it comes from) for `auto`: distributed.gpu_memory_gb, else this machine's
    GPU (where `run` starts the ranks), else its RAM shared by the CPU processes `run` would start."""
    from distsft.runtime import hardware
    d = spec.distributed
    if d.gpu_memory_gb:
        return float(d.gpu_memory_gb), "distributed.gpu_memory_gb"
    seen = hardware.gpu_memory_gb()
    if seen:
        return seen, "this machine's GPU"
    return hardware.host_memory_gb() / max(1, d.gpus_per_node), "this machine's RAM shared by the CPU processes"


def _probe_record(spec: Any) -> Any:
    from pathlib import Path

    from distsft import rundir
    return Path(spec.output_dir) / rundir.AUTO_BATCH


def sized(spec: Any, world: int) -> Any:
    """The spec as if it ran on `world` processes (plan and the ranks may see other counts than the spec's)."""
    d = spec.distributed
    n = max(1, d.nodes)
    layout = {"gpus_per_node": world // n} if world % n == 0 else {"nodes": 1, "gpus_per_node": world}
    return spec.model_copy(update={"distributed": d.model_copy(update=layout)})


def _record(spec: Any, world: int) -> dict[str, Any] | None:
    """This output directory's auto_batch.json when it applies to this global batch and data-parallel
    width (a resume on another GPU count re-derives the micro-batch)."""
    import json
    try:
        rec = json.loads(_probe_record(spec).read_text())
    except (OSError, ValueError):
        return None
    if (rec.get("global_batch_size") == spec.train.global_batch_size
            and rec.get("dp_world") == dp_world(sized(spec, world))):
        return rec
    return None


def probed_micro(spec: Any, world: int) -> int | None:
    """The micro-batch a GPU probe settled on in this output directory (train.autobatch), so that a
    resume uses the same; None when no probe has run for this layout."""
    rec = _record(spec, world)
    return int(rec["per_device_train_batch_size"]) if rec and rec.get("probed", True) else None


def auto_requested(spec: Any, world: int) -> bool:
    """Whether the micro-batch is `auto`: said by the spec, or (run.yaml holds the number the launcher
    resolved) by the launcher's record of its estimate."""
    return spec.train.per_device_train_batch_size == "auto" or _record(spec, world) is not None


def record_auto(spec: Any, world: int, micro: int, estimated: int, probed: bool) -> None:
    """The one writer of rundir.AUTO_BATCH (written whole, then renamed): the launcher records its
    estimate (probed false) so the ranks know to probe; rank 0 records what the probe settled on."""
    import json
    import os
    path = _probe_record(spec)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"per_device_train_batch_size": micro, "estimated": estimated, "probed": probed,
                               "global_batch_size": spec.train.global_batch_size,
                               "dp_world": dp_world(sized(spec, world))}) + "\n")
    os.replace(tmp, path)


def forget_resolved() -> None:
    """Drop what auto_micro remembered, so the next call reads the probe's record."""
    _RESOLVED.clear()


_RESOLVED: dict[str, int] = {}


def auto_micro(spec: Any, world: int) -> int:
    """What `per_device_train_batch_size: auto` resolves to at this world size (cached per spec: plan,
    render and the launcher ask more than once). SpecError when the model's config cannot be read or
    nothing fits."""
    import json
    key = json.dumps([spec.to_dict(), world], sort_keys=True, default=str)
    if key in _RESOLVED:
        return _RESOLVED[key]
    g = spec.train.global_batch_size
    probed = probed_micro(spec, world)
    if probed:
        _RESOLVED[key] = probed
        return probed
    shape = memory.model_shape(spec.model.name_or_path, spec.model.trust_remote_code)
    if shape is None:
        raise SpecError(f"train.per_device_train_batch_size: auto needs the model's config to estimate memory, and "
                        f"{spec.model.name_or_path!r} has none readable here (not local, not cached, not bundled); "
                        "set a number")
    gb, _ = memory_budget(spec)
    _RESOLVED[key] = resolve_micro(sized(spec, world), shape, gb, g).micro
    return _RESOLVED[key]
