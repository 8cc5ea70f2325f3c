"""Checkpoint saves that stay fast at scale, and what they cost.

* Intermediate and preemption checkpoints never gather the full model on one rank. FSDP2 writes
  SHARDED_STATE_DICT (DCP) shards, and HF's save_model writes nothing more (fsdp.py). Under ZeRO-3 HF's
  save_model would gather every layer into one consolidated 16-bit state dict first (the rendered
  `stage3_gather_16bit_weights_on_model_save: true`, needed for the final model; for a PEFT model the
  adapter is gathered through every layer too) before DeepSpeed's `save_checkpoint` writes the
  partitioned weights and optimizer states that a resume loads. At an intermediate save distsft keeps
  only the latter, plus the config, so the cost of a save is each rank writing its own partition.
  The final model (`trainer.save_model(output_dir)` at the end of train/recipe.py) is still consolidated.
* Every save's duration goes to metrics.jsonl as `save_seconds` (rank 0, the slowest rank's time,
  barrier included). When the last save plus one step would not fit in `slurm.signal_delay_s` (the
  warning SLURM gives before the time limit), the run warns once with the value to set.

`DISTSFT_GATHER_INTERMEDIATE_SAVES=1` restores HF's gathering intermediate ZeRO-3 saves; it exists only so
benchmarks/save_time.py can measure the before/after on the same code.
"""

from __future__ import annotations

import math
import os
from typing import Any

from distsft.runtime import dist
from distsft.runtime import envvars

GATHER_ENV = envvars.GATHER_INTERMEDIATE_SAVES
# Headroom over the measured save + step: a save under memory or file-system pressure is slower.
SAFETY = 1.5


def is_zero3(trainer: Any) -> bool:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return False
    plugin = trainer.accelerator.state.deepspeed_plugin
    return plugin is not None and int(plugin.zero_stage) == 3


def sharded_only(trainer: Any, internal: bool) -> bool:
    """True for an intermediate ZeRO-3 save (HF's `_internal_call`), unless the benchmark switch asks
    for HF's gathering behaviour."""
    return internal and is_zero3(trainer) and not envvars.gather_intermediate_saves()


def save_metadata(trainer: Any, output_dir: str) -> None:
    """What an intermediate ZeRO-3 checkpoint carries besides DeepSpeed's shards: the model config and the
    tokenizer (rank 0), so the folder still says what model it is."""
    if not trainer.args.should_save:
        return
    os.makedirs(output_dir, exist_ok=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "save_pretrained"):
        config.save_pretrained(output_dir)
    if trainer.processing_class is not None:
        trainer.processing_class.save_pretrained(output_dir)


def budget_warning(save_seconds: float, step_seconds: float | None, signal_delay_s: int) -> str | None:
    """The one-time warning when the last save plus one step would not fit in signal_delay_s."""
    step = float(step_seconds or 0.0)
    needed = save_seconds + step
    if needed <= signal_delay_s:
        return None
    suggest = int(math.ceil(needed * SAFETY / 10.0) * 10)
    return (f"a checkpoint save took {save_seconds:.1f} s and a step {step:.1f} s: {needed:.1f} s, more than "
            f"slurm.signal_delay_s={signal_delay_s}, the warning SLURM gives before the time limit; a "
            f"preemption save may not finish in time. Set slurm.signal_delay_s={suggest}")


class SaveClock:
    """Measures each save (all ranks; rank 0 logs) and warns once when saves outgrow signal_delay_s."""

    def __init__(self, signal_delay_s: int | None):
        self.signal_delay_s = signal_delay_s
        self.warned = False
        self.last: float | None = None

    def record(self, seconds: float, step: int, step_seconds: float | None, writer: Any, device: Any) -> None:
        # The slowest rank's time is the save's time (ranks wait for each other at the marker barrier).
        seconds = dist.all_reduce([seconds], "max", device=device)[0]
        self.last = seconds
        if writer is not None:
            writer.write({"step": step, "save_seconds": round(seconds, 4)})
        if self.warned or self.signal_delay_s is None:
            return
        msg = budget_warning(seconds, step_seconds, self.signal_delay_s)
        if msg is not None:
            self.warned = True
            if writer is not None:
                dist.warn(f"warning: step {step}: {msg}")
                writer.write({"step": step, "warning": msg})
