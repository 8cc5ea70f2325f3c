"""Complete-or-absent checkpoints: the typed marker, the newest-complete lookup, retention, and the
resume path a spec names.

A checkpoint directory (HF layout, `checkpoint-STEP/`) counts only once its marker
(`distsft_complete.json`, a `Marker`) exists in it; rank 0 writes it after every rank has finished
writing (a barrier), so a job killed mid-save leaves a directory that is never loaded. `write_marker`
is its one writer and `read_marker` its one reader.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from distsft.errors import SpecError
from distsft import rundir

MARKER = rundir.MARKER
_CKPT = rundir.CHECKPOINT_RE


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


MARKER_VERSION = 2  # 1: the untyped dict of earlier releases (read with the fields it has)


@dataclass(frozen=True)
class Marker:
    """What a complete checkpoint records about the run that wrote it: the inputs of the resume guards
    (checkpoint.resume) and of the universal-conversion decision (checkpoint.universal). Fields an older
    marker lacks read as None, and the guards skip them; unknown fields (a newer release) are ignored."""
    step: int
    rows_consumed: int | None = None  # step × global batch: the sample the run continues from
    world_size: int | None = None
    global_batch_size: int | None = None
    seed: int | None = None
    num_rows: int | None = None
    backend: str | None = None
    zero_stage: int | None = None
    optim: str | None = None
    data_key: str | None = None  # the training data's cache key (files, tokenizer, template, settings)
    max_length: int | None = None
    packing: bool | None = None
    # the layout that wrote it; a resume may change it (the same global batch and sample order hold)
    sequence_parallel_size: int | None = None
    time: float | None = None
    version: int = MARKER_VERSION

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Marker":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in known} | {"version": raw.get("version", 1)})


def read_marker(path: str | Path) -> Marker:
    return Marker.from_dict(json.loads((Path(path) / MARKER).read_text()))


def write_marker(path: str | Path, marker: Marker) -> None:
    fd, tmp = tempfile.mkstemp(prefix=MARKER + ".", suffix=".tmp", dir=path)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(marker), f, indent=1)
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


def clear_incomplete(path: str | Path) -> bool:
    """Before a save into `checkpoint-N`: remove an incomplete `checkpoint-N` an earlier attempt left
    (e.g. ZeRO shards of another world size, which must not survive beside the new ones). A complete
    one is left alone. Returns whether something was removed."""
    p = Path(path)
    if p.is_dir() and not is_complete(p):
        shutil.rmtree(p)
        return True
    return False
