"""Rank-0 progress: a rich bar on a terminal, plain lines otherwise (SLURM logs, CI, pipes)."""

from __future__ import annotations

import sys
import time
from typing import Any


def _fmt_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total_steps: int, enabled: bool, tty: bool | None = None):
        self.total, self.enabled = total_steps, enabled
        self.tty = sys.stdout.isatty() if tty is None else tty
        self._start = time.perf_counter()
        self._first_step: int | None = None
        self._bar = self._task = None
        if enabled and self.tty:
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
            self._bar = RichProgress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                     TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
            self._task = self._bar.add_task("train", total=total_steps, info="")
            self._bar.start()

    def update(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(record["step"])
        if "eval_loss" in record:
            self._print(f"step {step}/{self.total} | eval_loss {record['eval_loss']:.4f}")
            return
        if "loss" not in record:
            return
        if self._first_step is None:
            self._first_step, self._start = step, time.perf_counter()
        done = step - self._first_step
        rate = done / (time.perf_counter() - self._start) if done else 0.0
        eta = _fmt_eta((self.total - step) / rate) if rate else "?"
        info = (f"loss {record['loss']:.4f} | lr {record.get('learning_rate', 0):.2e} | "
                f"{record.get('tokens_per_second', 0):,.0f} tok/s")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            self._print(f"step {step}/{self.total} | {info} | eta {eta}")

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
