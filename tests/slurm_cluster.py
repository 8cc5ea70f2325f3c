"""Session fixture ``slurm_cluster``: a real two-node SLURM cluster on localhost.

The cluster is the one of ``slurm/local-cluster.sh`` (nodes n1 and n2, partition ``debug``, accounting
through slurmdbd so that ``sacct`` and submitit's job states work). The fixture starts it once per
session unless it already runs, and stops it at the end only if it started it. It skips the tests
only when the script could not install SLURM because apt-get cannot reach the package registry.

Register it from tests/conftest.py with ``pytest_plugins = ["slurm_cluster"]``, or import it into a
test module: tests/conftest.py registers it (``pytest_plugins``).

Job ids restart at 1 on a fresh state dir: give every submitit executor a fresh folder (tmp_path).
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "slurm" / "local-cluster.sh"
APT_UNREACHABLE = 3  # exit status of `local-cluster.sh start` when apt-get cannot reach the registry


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    slurm_conf: Path
    nodes: tuple[str, ...] = ("n1", "n2")
    partition: str = "debug"
    env: dict[str, str] = field(default_factory=dict, repr=False)

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a SLURM command (sbatch, srun, sacct, ...) against this cluster; text output."""
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=self.env)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        return proc


def _script(action: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(SCRIPT), action], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    state_dir = Path(os.environ.get("DISTSFT_SLURM_DIR", "/tmp/distsft-slurm"))
    started = False
    if _script("status", timeout=60).returncode != 0:
        proc = _script("start", timeout=900)  # the first start may install packages
        if proc.returncode == APT_UNREACHABLE:
            pytest.skip("SLURM is not installed and apt-get cannot reach the package registry")
        if proc.returncode != 0:
            pytest.fail(f"slurm/local-cluster.sh start exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
        started = True
    slurm_conf = state_dir / "etc" / "slurm.conf"
    env = {**os.environ, "SLURM_CONF": str(slurm_conf)}
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    old_conf = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(slurm_conf)  # for code under test that calls sbatch/sacct itself
    try:
        yield SlurmCluster(state_dir=state_dir, slurm_conf=slurm_conf, env=env)
    finally:
        if old_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old_conf
        if started:
            _script("stop", timeout=120)
