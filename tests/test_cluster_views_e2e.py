"""Issue 14 on the real two-node SLURM cluster of slurm/local-cluster.sh: requeue bookkeeping (a crash
after a preemption and requeue is a failure, not "preempted") and a node that does not see the output
dir (exit 2 within seconds, naming the node and the path)."""
from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

import helpers as h
from distsft.rundir import PREEMPTED
from private_view import private_view
from slurm_cluster import SlurmCluster
from test_slurm_e2e import Waiter, submit_env, wait_for_step

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_a_crash_after_preemption_and_requeue_is_exit_1_not_75(slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    model = tmp_path / "model"
    shutil.copytree(h.TINY, model)
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    w = Waiter(spec, "--nodes", 1, "--gpus", 1, f"model.name_or_path={model}", "train.max_steps=60",
               "slurm.max_requeues=2", env=submit_env(tmp_path / "cache"))
    job = w.job_id
    wait_for_step(out, 2, w)
    slurm_cluster.run("scancel", "--signal=USR2", job)
    h.wait_until(lambda: (out / PREEMPTED).exists() or w._ended(), 120, "the preemption checkpoint")
    # A real crash of the requeued job: its model's weights file is damaged (the first attempt already
    # loaded it; the requeued one loads it again before resuming).
    weights = next(model.glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")
    rc = w.wait(timeout=300)
    assert f"requeued job {job} after checkpoint-" in w.text, w.text[-4000:]
    assert f"job {job} was requeued (restart 1" in w.text
    assert rc == 1, w.text[-4000:]
    assert f"job {job} ended FAILED" in w.text and "preempted and not requeued" not in w.text
    assert not (out / PREEMPTED).exists()  # cleared when the requeued attempt started


def test_a_node_that_does_not_see_the_output_dir_stops_the_job_with_exit_2_naming_it(
        slurm_cluster: SlurmCluster, tmp_path: Path) -> None:
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    (out / "submitit").mkdir(parents=True)
    # What n2 sees at output_dir: a directory of its own (say, node-local scratch) holding the same
    # run.yaml; only the submitit folder (the job's pickles and logs) is shared, so that the job starts.
    local = tmp_path / "n2-local"
    local.mkdir()
    subprocess.run([*h.DISTSFT, "render", str(spec), "--nodes", "2", "--gpus", "1", "--out", str(local)],
                   check=True, env=submit_env(tmp_path / "cache"), cwd=h.ROOT, capture_output=True, timeout=120)
    with private_view(slurm_cluster, "n2", out, local, shared_sub="submitit"):
        w = Waiter(spec, "--nodes", 2, "--gpus", 1, env=submit_env(tmp_path / "cache"))
        job = w.job_id
        h.wait_until(lambda: f"job {job} RUNNING" in w.text or w._ended(), 180, "the job to start")
        started = time.monotonic()
        rc = w.wait(timeout=240)
        took = time.monotonic() - started
    text = " ".join(w.text.split())
    assert rc == 2, w.text[-4000:]
    assert f"output_dir {out} is not shared: node(s) n2 (rank(s) 1)" in text, w.text[-4000:]
    assert "on node n1" in text
    assert took < 90, took  # imports and the rendezvous, then a few seconds of looking
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.jsonl").exists()
