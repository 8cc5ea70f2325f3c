"""Progress, one display for both things that take long: training (rank 0) and a data build (the
launcher or a node's first rank). A rich bar on a terminal, plain lines otherwise (SLURM logs, CI, pipes);
time left is written one way (`time_left`) in both."""

from __future__ import annotations

import sys
import time
from typing import Any


def time_left(seconds: float) -> str:
    """H:MM:SS, or M:SS under an hour."""
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
        eta = time_left((self.total - step) / rate) if rate else "?"
        info = (f"loss {record['loss']:.4f} | lr {record.get('learning_rate', 0):.2e} | "
                f"{record.get('tokens_per_second', 0):,.0f} tok/s")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        else:
            self._print(f"step {step}/{self.total} | {info} | eta {eta}")

    def _print(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


# --------------------------------------------------------------------------- data builds
# Quiet for builds that finish within a few seconds; then examples/s and the time left.
_PLAIN_EVERY_S = 10.0
_SHOW_AFTER_S = 2.0


class BuildProgress:
    def __init__(self, total: int, what: str, stream: Any = None):
        self.total, self.what, self.done = total, what, 0
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._start = self._last = time.perf_counter()
        self._bar = self._task = None
        self._printed = False

    def __enter__(self) -> "BuildProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._bar is not None:
            self._bar.stop()
        elif self._printed and exc[0] is None:
            self._line()

    def rate(self) -> float:
        elapsed = time.perf_counter() - self._start
        return self.done / elapsed if elapsed > 0 else 0.0

    def advance(self, n: int) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self._start < _SHOW_AFTER_S:
            return
        if self.tty:
            if self._bar is None:
                from rich.console import Console
                from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
                self._bar = Progress(TextColumn(f"{self.what}"), BarColumn(),
                                     TextColumn("{task.completed:,}/{task.total:,} examples"),
                                     TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                                     console=Console(file=self.stream), transient=False)
                self._task = self._bar.add_task(self.what, total=self.total, rate="")
                self._bar.start()
            self._bar.update(self._task, completed=min(self.done, self.total), rate=f"{self.rate():,.0f} ex/s")
        elif now - self._last >= _PLAIN_EVERY_S or not self._printed:
            self._line()
            self._last = now

    def _line(self) -> None:
        self._printed = True
        rate = self.rate()
        left = (self.total - self.done) / rate if rate > 0 and self.total > self.done else 0
        print(f"{self.what}: {self.done:,}/{self.total:,} examples, {rate:,.0f} examples/s"
              + (f", {time_left(left)} left" if left else ""), file=self.stream, flush=True)
