"""Give one node of the local SLURM cluster its own view of a directory: restart that node's slurmd in
a private mount namespace where `path` shows another directory (`view`), as on a cluster whose
output_dir is node-local scratch, or a mount missing on one node. Optionally one subdirectory
(`shared_sub`, e.g. the submitit folder) stays the real, shared one. The node's slurmd (and every job
step it starts) sees that view; the other node and this process see the real directory. On exit the
node's ordinary slurmd is restored (the namespace goes with the last process in it)."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

from helpers import wait_until
from slurm_cluster import SlurmCluster


def _slurmd_pid(cluster: SlurmCluster, node: str) -> int | None:
    try:
        pid = int((cluster.state_dir / "pids" / f"slurmd-{node}.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def _stop_slurmd(cluster: SlurmCluster, node: str) -> None:
    pid = _slurmd_pid(cluster, node)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    wait_until(lambda: _slurmd_pid(cluster, node) is None or not Path(f"/proc/{pid}").exists(), 30,
               f"slurmd {node} (pid {pid}) to stop")
    time.sleep(0.5)


def _node_up(cluster: SlurmCluster, node: str) -> bool:
    state = cluster.run("sinfo", "-h", "-N", "-n", node, "-o", "%t", check=False).stdout.strip()
    return state in ("idle", "mix", "alloc")


@contextlib.contextmanager
def private_view(cluster: SlurmCluster, node: str, path: Path, view: Path, shared_sub: str | None = None) -> Iterator[None]:
    side = view.parent / f".{view.name}-shared-{node}"
    lines = ["set -e"]
    if shared_sub:
        side.mkdir(parents=True, exist_ok=True)
        (view / shared_sub).mkdir(parents=True, exist_ok=True)
        lines.append(f"mount --bind '{path / shared_sub}' '{side}'")
    lines.append(f"mount --bind '{view}' '{path}'")
    if shared_sub:
        lines.append(f"mount --bind '{side}' '{path / shared_sub}'")
    lines.append(f"exec slurmd -N {node}")
    env = dict(cluster.env)
    _stop_slurmd(cluster, node)
    try:
        subprocess.run(["unshare", "--mount", "--propagation", "private", "bash", "-c", "\n".join(lines)],
                       check=True, env=env, timeout=60)
        wait_until(lambda: _node_up(cluster, node), 60, f"node {node} to come back (private view)")
        yield
    finally:
        _stop_slurmd(cluster, node)
        subprocess.run(["slurmd", "-N", node], check=False, env=env, timeout=60)
        wait_until(lambda: _node_up(cluster, node), 60, f"node {node} to come back")
