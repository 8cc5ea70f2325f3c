"""Resume a DeepSpeed ZeRO checkpoint on another process count, through DeepSpeed's universal checkpoint.

A ZeRO-1/2/3 checkpoint stores the optimizer state (and, at stage 3, the weights) partitioned by the
world size that wrote it; DeepSpeed refuses to load it on another one (DeepSpeed#5405). Its own
converter, `deepspeed.checkpoint.ds_to_universal`, consolidates those partitions into one folder per
parameter (fp32 weight, Adam moments, step), which any world size then loads with the DeepSpeed config
`"checkpoint": {"load_universal": true}`.

Layout, inside the distsft checkpoint `OUTPUT_DIR/checkpoint-N/`:

    global_stepN/               what the run saved (untouched)
    global_stepN_universal/     the conversion (written under a temporary name, then renamed)
    latest_universal            "global_stepN_universal": the tag DeepSpeed loads when load_universal is on

HF Trainer then resumes as usual: `deepspeed_load_checkpoint` finds `global_step*` and calls
`engine.load_checkpoint(checkpoint-N)` without a tag, which reads `latest_universal`. The scheduler
state is world-size independent; the per-rank RNG files only matter for dropout (HF skips missing ones).

Only the process that converts (the launcher before ranks start, or rank 0 before the process group
exists while the others poll `wait_converted`) calls `convert_if_needed`; every rank calls
`needs_universal` to build the same config.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distsft.checkpoint.store import read_marker
from distsft.errors import SpecError

LATEST_UNIVERSAL = "latest_universal"
SUFFIX = "_universal"
_TMP_PREFIX = ".converting-"
_STEP_DIR = re.compile(r"^global_step\d+$")
MAX_WORKERS = 16


def deepspeed_tag(checkpoint_dir: str | Path) -> str | None:
    """The DeepSpeed tag saved in a distsft checkpoint (`global_stepN`), or None when it holds no
    DeepSpeed state (a DDP checkpoint)."""
    ckpt = Path(checkpoint_dir)
    latest = ckpt / "latest"
    if latest.is_file():
        tag = latest.read_text().strip()
        if (ckpt / tag).is_dir():
            return tag
    found = [p.name for p in ckpt.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)] if ckpt.is_dir() else []
    return max(found, key=lambda name: int(name[len("global_step"):])) if found else None


def needs_universal(checkpoint_dir: str | Path, world_size: int) -> bool:
    """True when resuming this checkpoint on `world_size` processes must go through the universal
    checkpoint: a DeepSpeed ZeRO (stage >= 1) checkpoint written by another number of processes.
    A pure read, the same answer on every rank."""
    ckpt = Path(checkpoint_dir)
    marker = read_marker(ckpt)
    if int(marker.world_size or world_size) == int(world_size):
        return False
    tag = deepspeed_tag(ckpt)
    if tag is None or (marker.backend or "deepspeed") != "deepspeed":
        return False
    stage = marker.zero_stage
    if stage is None:  # a marker from before distsft recorded it: ZeRO leaves per-rank optimizer shards
        stage = 1 if any((ckpt / tag).glob("*zero_pp_rank_*optim_states.pt")) else 0
    # Stage 0 partitions nothing: DeepSpeed loads its full optimizer state on any world size.
    return int(stage) > 0


def universal_tag(checkpoint_dir: str | Path) -> str:
    tag = deepspeed_tag(checkpoint_dir)
    if tag is None:
        raise SpecError(f"{checkpoint_dir} holds no DeepSpeed state (no global_step* folder) to convert")
    return tag + SUFFIX


def is_converted(checkpoint_dir: str | Path) -> bool:
    ckpt = Path(checkpoint_dir)
    tag = deepspeed_tag(ckpt)
    if tag is None:
        return False
    latest = ckpt / LATEST_UNIVERSAL
    return ((ckpt / (tag + SUFFIX) / "zero").is_dir() and latest.is_file()
            and latest.read_text().strip() == tag + SUFFIX)


def _write_latest(ckpt: Path, tag: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=LATEST_UNIVERSAL + ".", suffix=".tmp", dir=ckpt)
    with os.fdopen(fd, "w") as f:
        f.write(tag)
    os.replace(tmp, ckpt / LATEST_UNIVERSAL)


def temp_dir(ckpt: Path, name: str) -> Path:
    """A fresh conversion folder, unique per host and process (containers on several nodes share pids,
    so a pid alone does not tell two converters apart); leftovers of dead converters on this host go."""
    host = socket.gethostname()
    for old in ckpt.glob(f"{_TMP_PREFIX}{name}-*"):
        parts = old.name[len(_TMP_PREFIX + name) + 1:].rsplit("-", 2)  # host-pid-random
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _alive(int(parts[1])):
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-{host}-{os.getpid()}-", dir=ckpt))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def usable_cpus() -> int:
    """CPUs this process may run on (SLURM's --cpus-per-task binding included)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def conversion_command(src: Path, dst: Path, cpus: int) -> list[str]:
    """DeepSpeed's converter as a command: one extract worker per usable CPU (up to MAX_WORKERS), and
    a quarter as many merge workers (each holds a parameter's every shard: memory-bound, as DeepSpeed's
    help says). HF Trainer's engine records no universal_checkpoint_info; a plain (no TP/PP) model
    needs none beyond the version, which --inject_missing_state adds."""
    extract = max(1, min(cpus, MAX_WORKERS))
    return [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(src),
            "--output_folder", str(dst), "--num_extract_workers", str(extract),
            "--num_merge_workers", str(max(1, extract // 4)), "--inject_missing_state"]


def convert(checkpoint_dir: str | Path, *, quiet: bool = True) -> Path:
    """Convert `checkpoint-N/global_stepN` into `checkpoint-N/global_stepN_universal` with DeepSpeed's
    `ds_to_universal` (ZeRO-1/2 and ZeRO-3 alike), then point `latest_universal` at it. Atomic: the
    conversion is written under a temporary name and renamed; an interrupted one is redone. Skips a
    checkpoint that is already converted. Returns the universal folder."""
    ckpt = Path(checkpoint_dir)
    tag = deepspeed_tag(ckpt)
    if tag is None:
        raise SpecError(f"{ckpt} holds no DeepSpeed state (no global_step* folder) to convert")
    final = ckpt / (tag + SUFFIX)
    if is_converted(ckpt):
        return final
    if (final / "zero").is_dir():  # renamed but `latest_universal` not written yet
        _write_latest(ckpt, final.name)
        return final
    tmp = temp_dir(ckpt, final.name)
    # In a child process with a pool of workers: the converting rank may hold a process group and
    # threads, which a process pool forked from it would inherit; a fresh interpreter forks cleanly.
    cmd = conversion_command(ckpt / tag, tmp, usable_cpus())
    log = ""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True)
        log = p.stdout + p.stderr
        if p.returncode != 0:
            raise RuntimeError(f"ds_to_universal exited {p.returncode}")
    except (RuntimeError, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        (ckpt / LATEST_UNIVERSAL).unlink(missing_ok=True)  # main() may have pointed it at tmp
        tail = "\n".join(log.strip().splitlines()[-15:])
        world = read_marker(ckpt).world_size
        raise SpecError(f"converting {ckpt / tag} to a DeepSpeed universal checkpoint failed "
                        f"({type(exc).__name__}: {exc}); resume with the {world} processes that wrote it, "
                        f"or set checkpoint.resume=never\n{tail}") from exc
    if not quiet:
        print(log, end="", flush=True)
    os.replace(tmp, final)
    # ds_to_universal wrote latest_universal naming the temporary folder; name the final one.
    _write_latest(ckpt, final.name)
    return final


def convert_if_needed(checkpoint_dir: str | Path, world_size: int) -> bool:
    """On the one process that converts: convert when `needs_universal`. Returns whether the resume must
    load the universal checkpoint (DeepSpeed config `checkpoint.load_universal`)."""
    if not needs_universal(checkpoint_dir, world_size):
        return False
    ckpt = Path(checkpoint_dir)
    if not is_converted(ckpt):
        m = read_marker(ckpt)
        print(f"distsft: {ckpt.name} was written by {m.world_size} processes; converting its ZeRO-"
              f"{m.zero_stage} state to a DeepSpeed universal checkpoint for {world_size}", flush=True)
        convert(ckpt)
    return True


def wait_converted(checkpoint_dir: str | Path, poll_s: float = 1.0) -> None:
    """On the ranks that do not convert: until the converting rank has finished, however long it takes."""
    while not is_converted(checkpoint_dir):
        time.sleep(poll_s)


def _zero3_optimizer(optimizer: Any) -> Any:
    """DeepSpeed's ZeRO-3 optimizer under HF/accelerate's wrappers, or None (another stage)."""
    for _ in range(6):
        if optimizer is None or hasattr(optimizer, "fp32_partitioned_groups_flat"):
            return optimizer
        optimizer = getattr(optimizer, "optimizer", None)
    return None


def repair_zero3_load(optimizer: Any, checkpoint_dir: str | Path) -> bool:
    """Undo two faults of DeepSpeed 0.19.8's ZeRO-3 universal load (stage3.py,
    load_hp_checkpoint_state_from_checkpoint_dir_stage3) before the first step; ZeRO-1/2 load correctly.

    * One `step` tensor object is given to the Adam state of every ZeRO-3 sub-group. ZeRO-3 runs the
      optimizer once per sub-group and torch's Adam increments `step` in place, so the shared counter
      advances once per sub-group per optimizer step, and the bias correction runs ahead.
    * The hyperparameters of param group 0 are copied onto every param group: HF's no-decay group
      (norms, biases) gets the decay group's weight_decay.

    The step is untied (each state gets its own copy) and each group's hyperparameters are restored
    from the converted optimizer state, whose param groups are in the optimizer's order. Returns
    whether this was a ZeRO-3 optimizer."""
    import torch
    zero3 = _zero3_optimizer(optimizer)
    if zero3 is None:
        return False
    base = zero3.optimizer
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    path = Path(checkpoint_dir) / universal_tag(checkpoint_dir) / "zero" / "optimizer_state.pt"
    saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]["param_groups"]
    if len(saved) != len(base.param_groups):
        raise RuntimeError(f"{path} has {len(saved)} optimizer param groups, the optimizer {len(base.param_groups)}")
    for group, old in zip(base.param_groups, saved):
        group.update({k: v for k, v in old.items() if k != "params"})
    return True


def resume_callback(checkpoint_dir: str | Path) -> Any:
    """A TrainerCallback for a universal resume: `repair_zero3_load` once the checkpoint is loaded
    (HF calls on_train_begin after deepspeed_load_checkpoint, before the first step)."""
    from transformers import TrainerCallback

    class UniversalResume(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kw: Any) -> None:
            repair_zero3_load(optimizer, checkpoint_dir)

    return UniversalResume()


def with_load_universal(ds_config: dict[str, Any]) -> dict[str, Any]:
    """The rendered DeepSpeed config, loading the universal checkpoint (a copy; the input is unchanged)."""
    cfg = dict(ds_config)
    cfg["checkpoint"] = dict(cfg.get("checkpoint") or {}, load_universal=True)
    return cfg
