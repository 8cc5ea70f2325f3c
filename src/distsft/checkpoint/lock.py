"""The output-dir lock: one live job per OUTPUT_DIR, so a second one refuses to start (exit 2) instead of
interleaving checkpoints.

Normally `flock` on OUTPUT_DIR/.distsft.lock: the kernel releases it when the holder dies. Some cluster
file systems refuse flock: Lustre mounted `noflock` raises ENOSYS, NFS mounted `nolock` ENOLCK (and
some FUSE file systems EOPNOTSUPP). There the lock falls back to exclusive creation of
OUTPUT_DIR/.distsft.lock.owner (O_CREAT|O_EXCL, atomic on those file systems), holding the holder's
host, pid and SLURM job id, which the holder touches every HEARTBEAT_S. A holder counts as gone (the
file is stale and is taken over) when it is on this host and its pid is not alive, when it is an
earlier attempt of this very SLURM job (a requeue), or when it is on another host and its heartbeat is
older than STALE_S.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from distsft.runtime import dist
from distsft.errors import SpecError
from distsft import rundir

NO_FLOCK = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP}  # a file system that does not do flock
HEARTBEAT_S = 30.0
STALE_S = 300.0  # another host's holder whose heartbeat is older than this is gone


def _me() -> dict[str, Any]:
    e = dist.env()
    return {"host": e.node_name, "pid": os.getpid(), "job_id": e.job_id, "time": time.time()}


def _describe(holder: dict[str, Any]) -> str:
    job = f", SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}{job}"


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, TypeError):
        return True  # someone else's live process (or unreadable: assume live)
    return True


class OutputLock:
    """An exclusive lock on OUTPUT_DIR held for the life of a job."""

    def __init__(self, output_dir: str | Path):
        self.path = Path(output_dir) / rundir.LOCK
        self.owner = Path(output_dir) / rundir.LOCK_OWNER
        self._fd: int | None = None
        self._mine: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def _refuse(self, holder: str) -> SpecError:
        return SpecError(f"output_dir {self.path.parent} is in use by a live job ({holder}); "
                         "wait for it to finish, stop it, or choose another output_dir")

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.path.read_text().strip() or "another process"
            os.close(fd)
            raise self._refuse(holder) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in NO_FLOCK:
                raise
            self._acquire_owner_file()
            return
        os.ftruncate(fd, 0)
        os.write(fd, _describe(_me()).encode())
        self._fd = fd

    # ---------------------------------------------------------------- without flock
    def _read_owner(self) -> tuple[dict[str, Any] | None, float | None]:
        try:
            mtime = self.owner.stat().st_mtime
            return json.loads(self.owner.read_text() or "null"), mtime
        except FileNotFoundError:
            return None, None
        except (OSError, ValueError):
            return {}, time.time()  # being written right now: treat as a live holder

    def _stale(self, holder: dict[str, Any], mtime: float) -> bool:
        me = _me()
        if holder.get("job_id") and holder.get("job_id") == me["job_id"]:
            return True  # an earlier attempt of this job (requeued): it is not running any more
        if holder.get("host") == me["host"]:
            return not _pid_alive(holder.get("pid"))
        return time.time() - mtime > STALE_S

    def _acquire_owner_file(self) -> None:
        for _ in range(3):
            mine = _me()
            try:
                fd = os.open(self.owner, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder, mtime = self._read_owner()
                if holder is None:
                    continue  # released meanwhile: try again
                if not self._stale(holder, mtime or 0.0):
                    raise self._refuse(_describe(holder)) from None
                # Take a stale file over: rename it away first, so that of two jobs breaking it at once
                # only one removes it (the other's rename fails) and both race fairly on O_EXCL.
                aside = self.owner.with_name(f"{self.owner.name}.stale-{uuid.uuid4().hex[:8]}")
                try:
                    os.rename(self.owner, aside)
                    aside.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(mine, f)
                f.flush()
                os.fsync(f.fileno())
            self._mine = mine
            self._stop.clear()
            self._beat = threading.Thread(target=self._heartbeat, name="distsft-lock-heartbeat", daemon=True)
            self._beat.start()
            return
        holder, _ = self._read_owner()
        raise self._refuse(_describe(holder or {}))

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.owner)
            except OSError:
                pass

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._mine is not None:
            self._stop.set()
            holder, _ = self._read_owner()
            if holder and holder.get("pid") == self._mine["pid"] and holder.get("host") == self._mine["host"]:
                self.owner.unlink(missing_ok=True)
            self._mine = None
