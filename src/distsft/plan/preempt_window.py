"""Does a checkpoint fit in SLURM's warning before the time limit? Checked before the first save.

SLURM sends USR2 `slurm.signal_delay_s` seconds (120 by default) before the time limit; the ranks
finish the step they are in, then write one checkpoint, then the job is requeued. If that takes longer,
the job is killed mid-save and the time since the previous checkpoint is lost. The size of one save is
known from the plan (plan.ckpt_size: 12 bytes per trainable parameter sharded over the ranks for FSDP2
and ZeRO-3, 16 on rank 0 for DDP, ...: ~96 GB per node for an 8B full fine-tune), so the check needs
only a write bandwidth:

* `slurm.checkpoint_write_gbps` (GB/s per node, what the file system sustains) when the spec gives it:
  a save that does not fit is an error (exit 2) at `submit`, a warning in `plan`;
* otherwise ASSUMED_WRITE_GBPS, a modest parallel file system: a save that does not fit is a warning,
  and an error only when it would not fit even at FAST_WRITE_GBPS.

The rank measures the real save time later (checkpoint.saves.SaveClock) and warns again if needed.
"""

from __future__ import annotations

import math
from typing import Any

ASSUMED_WRITE_GBPS = 1.0  # GB/s per node: one node writing to a shared parallel file system
FAST_WRITE_GBPS = 5.0     # GB/s per node: a fast one; a save too slow even at this cannot fit
SAFETY = 1.5              # headroom for a busy file system, as checkpoint.saves uses
GIB = 2**30


def save_seconds(per_node_gb: float, gbps: float) -> float:
    """Seconds to write `per_node_gb` GiB at `gbps` GB/s (10^9 bytes) per node."""
    return per_node_gb * GIB / (gbps * 1e9)


def check(spec: Any, checkpoint: dict[str, Any] | None, step_seconds: float | None = None) -> tuple[str | None, str | None]:
    """(warning, error) for the spec's checkpoint size against slurm.signal_delay_s; (None, None) when
    it fits or the size is unknown. `checkpoint`: plan.memory.estimate()["checkpoint"]."""
    if not checkpoint:
        return None, None
    s = spec.slurm
    delay = s.signal_delay_s
    per_node = float(checkpoint["per_node_gb"])
    step = float(step_seconds or 0.0)
    given = getattr(s, "checkpoint_write_gbps", None)
    gbps = given or ASSUMED_WRITE_GBPS
    needed = save_seconds(per_node, gbps) + step
    if needed * SAFETY <= delay:
        return None, None
    suggest = int(math.ceil(needed * SAFETY / 10.0) * 10)
    what = (f"one checkpoint is ~{per_node:.1f} GB per node ({checkpoint.get('backend', '')}); at "
            f"{gbps:g} GB/s per node ({'slurm.checkpoint_write_gbps' if given else 'assumed'}) writing it takes "
            f"~{needed - step:.0f} s" + (f" plus ~{step:.0f} s to finish the step" if step else "")
            + f", more than slurm.signal_delay_s={delay} s with headroom: a preemption would kill the job "
            f"mid-save. Set slurm.signal_delay_s={suggest}")
    if given:
        return None, what
    fast = save_seconds(per_node, FAST_WRITE_GBPS) + step
    if fast > delay:
        return None, (what + f" (even at {FAST_WRITE_GBPS:g} GB/s per node it would take ~{fast:.0f} s); or give "
                      "your file system's speed as slurm.checkpoint_write_gbps")
    return what + " (or give your file system's speed as slurm.checkpoint_write_gbps)", None
