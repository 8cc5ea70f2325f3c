"""Progress of a data build: a rich bar on a terminal, plain lines otherwise (SLURM logs, pipes).

Quiet for builds that finish within a few seconds; then examples/s and the time left."""

from __future__ import annotations

import sys
import time
from typing import Any

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
              + (f", ~{left:,.0f} s left" if left else ""), file=self.stream, flush=True)
