"""slurm/torchrun_task.sh (what sbatch_template.sh runs on each node): the pre-kill signal that reaches
the task reaches torchrun's workers, and torchrun's agent neither dies of it (USR2) nor gives the
workers 30 s and SIGKILL (TERM) while they save."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers as h

pytestmark = pytest.mark.slow

WORKER = r"""
import json, os, signal, sys, time
got = []
signal.signal(signal.SIGUSR2, lambda s, f: got.append("USR2"))
signal.signal(signal.SIGTERM, lambda s, f: got.append("TERM"))
out = sys.argv[1]
open(f"{out}/ready-{os.environ['RANK']}", "w").close()
while not got:
    time.sleep(0.05)
time.sleep(3)  # "saving a checkpoint": the agent must leave the worker alone meanwhile
with open(f"{out}/saved-{os.environ['RANK']}", "w") as f:
    json.dump(got, f)
"""


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGTERM])
def test_the_signal_to_the_task_reaches_the_workers_and_torchrun_waits_for_them(tmp_path: Path, sig) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    env = dict(h.env(), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", SLURM_NODEID="0")
    task = subprocess.Popen(["bash", str(h.ROOT / "slurm" / "torchrun_task.sh"), "--standalone",
                             "--nproc_per_node", "2", str(worker), str(tmp_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    h.wait_until(lambda: len(list(tmp_path.glob("ready-*"))) == 2 or task.poll() is not None, 120, "the workers")
    task.send_signal(sig)  # what srun/slurmstepd delivers to the task
    t0 = time.monotonic()
    out = task.communicate(timeout=60)[0]
    assert task.returncode == 0, out
    assert time.monotonic() - t0 >= 2.5  # torchrun waited for the workers' "save"
    for rank in (0, 1):
        assert sig.name.removeprefix("SIG") in json.loads((tmp_path / f"saved-{rank}").read_text()), out
