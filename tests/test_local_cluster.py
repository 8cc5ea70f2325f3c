"""The local two-node SLURM cluster (slurm/local-cluster.sh) runs real jobs: multi-node srun, accounting
through sacct, USR2 delivery (what time-limit requeueing relies on) and a submitit round trip."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import wait_until
from slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def sacct_state(cluster: SlurmCluster, job_id: str) -> str:
    out = cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State").stdout.split()
    return out[-1] if out else ""


def test_srun_spans_both_nodes(slurm_cluster: SlurmCluster) -> None:
    out = slurm_cluster.run("srun", "-N2", "-n2", "--ntasks-per-node=1",
                            "bash", "-c", "echo $SLURMD_NODENAME $SLURM_NODEID").stdout
    assert sorted(out.splitlines()) == ["n1 0", "n2 1"], out


def test_sacct_reports_completed(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    job_id = slurm_cluster.run("sbatch", "--parsable", "--wait", "-N2", f"--chdir={tmp_path}",
                               "--output=out.txt", "--wrap", "srun hostname").stdout.strip()
    # The controller sends records to slurmdbd asynchronously: right after the job ends sacct may still
    # show no record, or only the batch host as NodeList, for a second or two.
    wait_until(lambda: sacct_state(slurm_cluster, job_id) == "COMPLETED", 20, f"job {job_id} COMPLETED")
    wait_until(lambda: slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "NodeList")
               .stdout.strip() == "n[1-2]", 20, f"sacct NodeList n[1-2] for job {job_id}")


def test_usr2_reaches_job_step_and_batch_script(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    # Plain `scancel --signal=USR2` (like sbatch --signal=USR2@N) reaches the processes of job steps
    # (srun), where submitit runs the function; the batch shell itself needs --batch (or B: in sbatch).
    # The traps kill their `sleep`: proctrack/linuxproc loses track of orphaned processes.
    script = tmp_path / "job.sh"
    script.write_text(f"""#!/bin/bash
trap 'echo batch > {tmp_path}/batch_got_usr2; kill $!; exit 0' USR2
srun bash -c 'trap "echo step > {tmp_path}/step_got_usr2; kill \\$!; exit 0" USR2; touch {tmp_path}/ready; sleep 60 & wait' &
sleep 60 & wait
""")
    job_id = slurm_cluster.run("sbatch", "--parsable", f"--chdir={tmp_path}", "--output=out.txt",
                               str(script)).stdout.strip()
    try:
        wait_until((tmp_path / "ready").exists, 30, "the job step to start")
        slurm_cluster.run("scancel", "--signal=USR2", job_id)
        wait_until((tmp_path / "step_got_usr2").exists, 10, "USR2 in the job step")
        assert not (tmp_path / "batch_got_usr2").exists()
        slurm_cluster.run("scancel", "--batch", "--signal=USR2", job_id)
        wait_until((tmp_path / "batch_got_usr2").exists, 10, "USR2 in the batch script's trap")
        wait_until(lambda: sacct_state(slurm_cluster, job_id) == "COMPLETED", 20, f"job {job_id} COMPLETED")
    finally:
        slurm_cluster.run("scancel", job_id, check=False)


def test_submitit_runs_on_both_nodes(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")
    executor = submitit.SlurmExecutor(folder=tmp_path / "submitit")  # fresh folder: job ids may repeat
    executor.update_parameters(partition="debug", nodes=2, ntasks_per_node=1, time=5)
    # A lambda is pickled by value: the job need not import this test module.
    job = executor.submit(lambda: (os.environ["SLURMD_NODENAME"], os.environ["SLURM_PROCID"]))
    assert sorted(job.results()) == [("n1", "0"), ("n2", "1")]
    wait_until(lambda: job.get_info(mode="force").get("State") == "COMPLETED", 20, "submitit state COMPLETED")
