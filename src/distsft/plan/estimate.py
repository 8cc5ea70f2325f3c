"""How long a run will take, in wall-clock hours and GPU-hours, before it is queued.

    hours = tokens to train / (tokens/s per GPU x GPUs) / 3600        gpu_hours = hours x GPUs

Tokens to train are the plan's real (non-padding) tokens per optimizer step x the steps. Tokens/s per
GPU come from one of two places, and the plan says which:

* **measured**: `distsft sanity` and every training run append their measured throughput to
  OUTPUT_DIR/throughput.jsonl (rundir.THROUGHPUT); a record for the same model and PEFT method on the
  same hardware is used, the newest first.
* **assumed**: peak FLOP/s x an assumed model FLOPs utilisation / training FLOPs per token. FLOPs per
  token follow observe.mfu's convention (forward 2N + backward 2N + 2 per trainable parameter, N the
  matmul parameters, an MoE's *active* ones), plus one more forward (2N) when activation checkpointing
  recomputes it. The peak is `logging.peak_tflops`, else this machine's GPU, else an H100's (989 TFLOP/s
  dense bf16) - said as such, since a plan on a login node cannot see the job's GPUs.

Attention's own FLOPs are not counted (as in MFU); at long sequences the estimate is optimistic.
Pure: no torch; the caller passes the device it plans for.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distsft import rundir

# What a well-fed SFT step reaches on current GPUs with packing and flash attention (HF/TRL stacks
# report ~30-40% on H100/A100); CPU offload moves the optimizer step to the host and roughly halves it.
ASSUMED_MFU = 0.35
ASSUMED_MFU_OFFLOAD = 0.15
DEFAULT_DEVICE, DEFAULT_PEAK_TFLOPS = "H100", 989.0
CPU = "cpu"


@dataclass(frozen=True)
class Estimate:
    tokens_per_second_per_gpu: float
    source: str                      # "measured" | "assumed"
    hours: float | None              # the whole run (None: the data was not read, tokens unknown)
    gpu_hours: float | None
    hours_per_epoch: float | None
    basis: str                       # one line: where the throughput comes from

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def flops_per_token(matmul_params: int, trainable_params: int, gradient_checkpointing: bool) -> float:
    """Training FLOPs per token: observe.mfu's 4N + 2T, plus the recomputed forward (2N) under
    activation checkpointing, which costs wall time although MFU does not count it."""
    return 4.0 * matmul_params + 2.0 * trainable_params + (2.0 * matmul_params if gradient_checkpointing else 0.0)


def assumed_mfu(spec: Any) -> float:
    d = spec.distributed
    return ASSUMED_MFU_OFFLOAD if d.offload_optimizer or d.offload_params else ASSUMED_MFU


def peak_for(spec: Any, device: str | None) -> tuple[float, str]:
    """(peak TFLOP/s, where it comes from) for the device the run is planned on."""
    from distsft.observe.mfu import peak_tflops
    if spec.logging.peak_tflops:
        return float(spec.logging.peak_tflops), "logging.peak_tflops"
    if device and device != CPU:
        known = peak_tflops(device)
        if known:
            return known, device
    return DEFAULT_PEAK_TFLOPS, (f"an {DEFAULT_DEVICE}'s: no GPU on this machine; set logging.peak_tflops "
                                 "for the job's GPUs" if not device or device == CPU else
                                 f"an {DEFAULT_DEVICE}'s: {device}'s peak is not known; set logging.peak_tflops")


# ----------------------------------------------------------------------------- measured records
def record_path(output_dir: str | Path) -> Path:
    return Path(output_dir) / rundir.THROUGHPUT


def append_record(output_dir: str | Path, record: dict[str, Any]) -> None:
    """One line per measurement; appended, so a resumed run or a second sanity keeps the earlier ones."""
    path = record_path(output_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"time": time.time(), **record}) + "\n")


def read_records(output_dir: str | Path) -> list[dict[str, Any]]:
    path = record_path(output_dir)
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash: the others still count
            continue
        if isinstance(rec, dict) and rec.get("tokens_per_second_per_gpu"):
            out.append(rec)
    return out


def measured_throughput(metrics: list[dict[str, Any]], world_size: int, skip: int = 1) -> float | None:
    """Tokens/s per GPU from metrics.jsonl lines: the median over logging windows after the first
    `skip` (which carry start-up: the first step's allocations, kernels being compiled)."""
    tps = [float(m["tokens_per_second"]) for m in metrics if m.get("tokens_per_second")]
    tps = tps[skip:] if len(tps) > skip else tps
    if not tps:
        return None
    tps.sort()
    mid = len(tps) // 2
    median = tps[mid] if len(tps) % 2 else (tps[mid - 1] + tps[mid]) / 2
    return median / max(1, world_size)


def make_record(spec: Any, source: str, device: str, world_size: int, tokens_per_second_per_gpu: float,
                micro: int) -> dict[str, Any]:
    d = spec.distributed
    return {"source": source, "model": spec.model.name_or_path, "peft_method": spec.peft.method,
            "device": device, "world_size": world_size, "backend": d.backend, "zero_stage": d.stage,
            "max_length": spec.data.max_length, "per_device_train_batch_size": micro,
            "gradient_checkpointing": spec.train.gradient_checkpointing,
            "tokens_per_second_per_gpu": round(tokens_per_second_per_gpu, 3)}


def matching_record(records: list[dict[str, Any]], spec: Any, device: str | None) -> dict[str, Any] | None:
    """The newest record of the same model and PEFT method on the same hardware. A plan on a machine
    without a GPU (device "cpu" or None) is planning for GPUs elsewhere when GPU records exist: then
    the newest GPU record counts; a CPU record counts only when no GPU record does (a CPU run here)."""
    same = [r for r in records if r.get("model") == spec.model.name_or_path
            and r.get("peft_method") == spec.peft.method]
    if not same:
        return None
    newest = lambda rs: max(rs, key=lambda r: r.get("time", 0)) if rs else None  # noqa: E731
    if device and device != CPU:
        return newest([r for r in same if r.get("device") == device])
    return newest([r for r in same if r.get("device") != CPU]) or newest([r for r in same if r.get("device") == CPU])


# ----------------------------------------------------------------------------- the estimate
def estimate(spec: Any, plan: Any, *, matmul_params: int | None, trainable_params: int | None,
             device: str | None, records: list[dict[str, Any]] | None = None) -> Estimate | None:
    """The run's time from the plan's tokens (None when neither a measured nor an assumed throughput
    can be had: the model's size is unknown and nothing was measured)."""
    world = plan.world_size
    rec = matching_record(records or [], spec, device)
    if rec is not None:
        tps = float(rec["tokens_per_second_per_gpu"])
        differs = [f"{k} {rec.get(k)}" for k, mine in (
            ("max_length", spec.data.max_length), ("backend", spec.distributed.backend),
            ("world_size", world)) if rec.get(k) is not None and rec.get(k) != mine]
        basis = (f"measured by {rec.get('source', 'a run')} on {rec.get('device')}"
                 + (f" (at {', '.join(differs)})" if differs else ""))
        source = "measured"
    elif matmul_params:
        peak, peak_from = peak_for(spec, device)
        mfu = assumed_mfu(spec)
        fpt = flops_per_token(matmul_params, trainable_params or 0, spec.train.gradient_checkpointing)
        tps = peak * 1e12 * mfu / fpt
        basis = (f"assumed: {mfu:.0%} MFU of {peak:g} TFLOP/s peak, {fpt / 1e9:.3g} GFLOPs per token; "
                 f"peak from {peak_from}")
        source = "assumed"
    else:
        return None
    hours = per_epoch = None
    if plan.tokens_per_step and plan.total_steps:
        per_s = tps * world
        hours = plan.tokens_per_step * plan.total_steps / per_s / 3600
        if plan.steps_per_epoch:
            per_epoch = plan.tokens_per_step * plan.steps_per_epoch / per_s / 3600
    sig = lambda x: None if x is None else float(f"{x:.6g}")  # noqa: E731 - 6 significant digits
    return Estimate(tokens_per_second_per_gpu=sig(tps), source=source, hours=sig(hours),
                    gpu_hours=sig(None if hours is None else hours * world), hours_per_epoch=sig(per_epoch),
                    basis=basis)


def duration(hours: float) -> str:
    """1.5 -> '1 h 30 min'; 0.01 -> '36 s'."""
    s = hours * 3600
    if s < 90:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    h, m = divmod(round(s / 60), 60)
    return f"{h} h {m} min" if h < 48 else f"{hours / 24:.1f} days"


def time_limit_warning(hours: float, time_min: int, max_requeues: int) -> str | None:
    """`submit`: the estimate against the SLURM time limit. Longer runs are requeued from their last
    checkpoint (each requeue also redoes the steps since that checkpoint and the start-up), which is fine
    while slurm.max_requeues allows enough of them; otherwise the run will not finish."""
    minutes = hours * 60
    if minutes <= time_min:
        return None
    jobs = math.ceil(minutes / time_min)
    requeues = jobs - 1
    head = f"the run is estimated at {duration(hours)}, longer than slurm.time_min={time_min} min"
    if requeues <= max_requeues:
        return (f"{head}: it will be requeued {requeues} time(s) and resume from its checkpoints "
                f"(slurm.max_requeues={max_requeues} allows it), which is fine")
    return (f"{head}: it needs {requeues} requeues but slurm.max_requeues={max_requeues}, so it will not "
            f"finish; raise slurm.time_min (>= {math.ceil(minutes / (max_requeues + 1))} min) or "
            "slurm.max_requeues")


def for_plan(spec: Any, plan: Any, mem: dict[str, Any] | None, device: str | None) -> Estimate | None:
    """The estimate `distsft plan` shows: matmul and trainable parameters from the memory estimate,
    scaled to the active share for an MoE model when its active parameter count is known
    (`num_active_parameters`), and the measured records in the spec's output directory."""
    total = (mem or {}).get("num_parameters")
    active = (mem or {}).get("num_active_parameters") or getattr(plan, "num_active_parameters", None) or total
    share = active / total if total and active else 1.0
    matmul = (mem or {}).get("matmul_parameters") or total
    trainable = (mem or {}).get("trainable_parameters")
    if spec.peft.method == "none" and trainable:
        trainable = int(trainable * share)  # every expert is trainable, but a token trains only its own
    return estimate(spec, plan, matmul_params=int(matmul * share) if matmul else None, trainable_params=trainable,
                    device=device, records=read_records(spec.output_dir))
