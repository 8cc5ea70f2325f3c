"""Complete-or-absent checkpoints, the newest-complete lookup, retention, the output-dir lock, and the
preemption flag.

A checkpoint directory (HF layout, `checkpoint-STEP/`) counts only once `distsft_complete.json` exists
in it; that marker is written by rank 0 after every rank has finished writing (a barrier), so a job
killed mid-save leaves a directory that is never loaded.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from .spec import SpecError

MARKER = "distsft_complete.json"
PREEMPTED = "PREEMPTED"  # written into OUTPUT_DIR when a run stopped on a signal after saving
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped on a signal after a complete checkpoint; rerun to resume
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class DiskFullError(Exception):
    """A checkpoint could not be written for lack of space; the previous complete one is intact."""


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def is_disk_full(exc: BaseException, output_dir: str | Path) -> bool:
    """Python I/O says ENOSPC; torch.save only says "iostream error" or "file write failed", so a
    failed save also counts as disk-full when there is no longer room for another checkpoint."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "no space left" in str(exc).lower():
        return True
    last = latest_complete(output_dir)
    needed = _size(last) if last else 64 * 2**20
    return shutil.disk_usage(output_dir).free < needed


def checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    out = []
    root = Path(output_dir)
    if root.is_dir():
        for p in root.iterdir():
            m = _CKPT.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p))
    return sorted(out)


def is_complete(path: str | Path) -> bool:
    return (Path(path) / MARKER).is_file()


def read_marker(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / MARKER).read_text())


def write_marker(path: str | Path, info: dict[str, Any]) -> None:
    tmp = Path(path) / (MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, Path(path) / MARKER)


def latest_complete(output_dir: str | Path) -> Path | None:
    done = [p for _, p in checkpoints(output_dir) if is_complete(p)]
    return done[-1] if done else None


def rotate(output_dir: str | Path, keep: int | None, protect: set[Path] | None = None) -> list[Path]:
    """Keep the newest `keep` complete checkpoints (and `protect`, e.g. the best one); remove older
    complete ones and incomplete leftovers older than the newest complete one. Never touches the
    newest complete checkpoint, nor an incomplete one newer than it (it may be being written)."""
    all_ckpts = checkpoints(output_dir)
    complete = [p for _, p in all_ckpts if is_complete(p)]
    if not complete:
        return []
    newest_step = int(_CKPT.match(complete[-1].name).group(1))  # type: ignore[union-attr]
    keepers = set(complete[-keep:]) if keep else set(complete)
    keepers |= {complete[-1]} | (protect or set())
    removed = []
    for step, p in all_ckpts:
        stale_partial = not is_complete(p) and step < newest_step
        if (is_complete(p) and p not in keepers) or stale_partial:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def resolve_resume(resume: str, output_dir: str | Path) -> Path | None:
    """`checkpoint.resume`: auto (newest complete, if any) | never | PATH (must be complete)."""
    if resume == "never":
        return None
    if resume == "auto":
        return latest_complete(output_dir)
    p = Path(resume)
    if not p.is_dir():
        raise SpecError(f"checkpoint.resume: {resume} is not a directory")
    if not is_complete(p):
        raise SpecError(f"checkpoint.resume: {resume} is not a complete distsft checkpoint "
                        f"(no {MARKER}: it was interrupted while being written)")
    return p


class OutputLock:
    """An exclusive lock on OUTPUT_DIR held for the life of a job, so a second job refuses to start
    instead of interleaving checkpoints. flock is released by the kernel when the holder dies."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / ".distsft.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "another process"
            os.close(fd)
            raise SpecError(f"output_dir {self.path.parent} is in use by a live job ({holder}); "
                            "wait for it to finish, stop it, or choose another output_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


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
