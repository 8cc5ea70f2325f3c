"""Preemption, whole: the signals that ask a run to stop, the flag the ranks agree on once per optimizer
step, the exit code that says "stopped after a complete checkpoint, rerun to resume", and the PREEMPTED
file in OUTPUT_DIR.

The PREEMPTED file's whole life cycle is here: written by rank 0 when a run stopped on a signal after a
complete checkpoint, cleared when a run starts (a requeued or rerun job, whatever happens to it next, is
no longer "the preempted one"), read by `distsft run` and `submit --wait` to tell 75 from a failure.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from distsft import rundir
from distsft.checkpoint.store import latest_complete

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after a complete checkpoint; rerun to resume


def mark_preempted(output_dir: str | Path, step: int) -> None:
    rundir.preempted_file(output_dir).write_text(f"step {step}\n")


def clear_preempted(output_dir: str | Path) -> None:
    rundir.preempted_file(output_dir).unlink(missing_ok=True)


def was_preempted(output_dir: str | Path) -> bool:
    return rundir.preempted_file(output_dir).exists()


def preempted_step(output_dir: str | Path) -> str | None:
    """The step of the preemption checkpoint (else of the newest complete one), or None."""
    try:
        return rundir.preempted_file(output_dir).read_text().split()[-1]
    except (OSError, IndexError):
        latest = latest_complete(output_dir)
        return latest.name.split("-")[-1] if latest else None



PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class PreemptionFlag:
    """Raised by any of PREEMPT_SIGNALS in this rank; ranks agree on it once per optimizer step."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> "PreemptionFlag":
        for s in PREEMPT_SIGNALS:
            signal.signal(s, self._handler)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum

    @property
    def raised(self) -> bool:
        return self.signum is not None
