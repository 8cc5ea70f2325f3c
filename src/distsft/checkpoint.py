"""Complete-or-absent checkpoints, the newest-complete lookup, retention, the output-dir lock, and the
preemption flag.

A checkpoint directory (HF layout, `checkpoint-STEP/`) counts only once `distsft_complete.json` exists
in it; that marker is written by rank 0 after every rank has finished writing (a barrier), so a job
killed mid-save leaves a directory that is never loaded.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import tempfile
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
    fd, tmp = tempfile.mkstemp(prefix=MARKER + ".", suffix=".tmp", dir=path)
    with os.fdopen(fd, "w") as f:
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


from .outlock import OutputLock  # noqa: E402,F401 - the output-dir lock lives in its own module


# ------------------------------------------------------------------------------ the PREEMPTED flag
# Its whole life cycle is here: written by rank 0 when a run stopped on a signal after a complete
# checkpoint, cleared when a run starts (a requeued or rerun job, whatever happens to it next, is no
# longer "the preempted one"), read by `distsft run` and `submit --wait` to tell 75 from a failure.

def mark_preempted(output_dir: str | Path, step: int) -> None:
    (Path(output_dir) / PREEMPTED).write_text(f"step {step}\n")


def clear_preempted(output_dir: str | Path) -> None:
    (Path(output_dir) / PREEMPTED).unlink(missing_ok=True)


def was_preempted(output_dir: str | Path) -> bool:
    return (Path(output_dir) / PREEMPTED).exists()


def preempted_step(output_dir: str | Path) -> str | None:
    """The step of the preemption checkpoint (else of the newest complete one), or None."""
    try:
        return (Path(output_dir) / PREEMPTED).read_text().split()[-1]
    except (OSError, IndexError):
        latest = latest_complete(output_dir)
        return latest.name.split("-")[-1] if latest else None


def clear_incomplete(path: str | Path) -> bool:
    """Before a save into `checkpoint-N`: remove an incomplete `checkpoint-N` an earlier attempt left
    (e.g. ZeRO shards of another world size, which must not survive beside the new ones). A complete
    one is left alone. Returns whether something was removed."""
    p = Path(path)
    if p.is_dir() and not is_complete(p):
        shutil.rmtree(p)
        return True
    return False


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
