"""GPUs, CPUs and memory on the real local SLURM cluster (slurm/local-cluster.sh), whose nodes carry a GPU
GRES on stand-in device files: `distsft submit` asks for --gpus-per-node, --cpus-per-task and --mem
derived from the nodes (sinfo), SLURM allocates them (`scontrol show -d job`: the GPU indices bound to
the job, CPUs per task, memory), each rank is given CUDA_VISIBLE_DEVICES -- and, finding no usable GPU
behind it, decides in the rank to train on the CPU and says so, instead of the submit host deciding."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

import helpers as h
from slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_gpus_cpus_and_memory_are_requested_and_the_rank_decides_cpu(slurm_cluster: SlurmCluster,
                                                                      tmp_path: Path) -> None:
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out, "slurm:\n  time_min: 10\n")
    env = dict(os.environ, DISTSFT_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    sinfo = slurm_cluster.run("sinfo", "-h", "-N", "-o", "%c %m %G").stdout.split("\n")[0].split()
    node_cpus, node_mem_gb = int(sinfo[0]), int(sinfo[1]) // 1024
    assert "gpu:" in sinfo[2], sinfo  # the emulated nodes have GPU GRES

    dry = subprocess.run([*h.DISTSFT, "submit", str(spec), "--nodes", "2", "--gpus", "1", "--dry-run",
                          "train.max_steps=4"], capture_output=True, text=True, env=env, cwd=h.ROOT, timeout=300)
    assert dry.returncode == 0, dry.stderr[-3000:]
    for line in (f"#SBATCH --cpus-per-task={node_cpus}", "#SBATCH --gpus-per-node=1", "#SBATCH --mem="):
        assert line in dry.stdout, dry.stdout

    p = subprocess.run([*h.DISTSFT, "submit", str(spec), "--nodes", "2", "--gpus", "1", "train.max_steps=4"],
                       capture_output=True, text=True, env=env, cwd=h.ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    job = re.search(r"submitted job (\d+)", p.stdout).group(1)
    try:
        shown = h.wait_until(lambda: (t := slurm_cluster.run("scontrol", "show", "-d", "job", job, check=False).stdout)
                             and "NodeList=n[1-2]" in t and t, 120, f"job {job} running")
        assert re.search(r"TresPerNode=\S*gpu:1", shown), shown
        assert f"CPUs/Task={node_cpus}" in shown, shown
        mem = int(re.search(r"MinMemoryNode=(\d+)G", shown).group(1))
        assert 1 <= mem <= node_mem_gb, shown
        assert re.search(r"GRES=gpu:1\(IDX:0\)", shown), shown  # the GPU bound to the job on each node
        state = lambda: slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", job, "-o", "State").stdout.strip()  # noqa: E731
        h.wait_until(lambda: state() in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), 600, f"job {job} to end")
        logs = {f.name: f.read_text() for f in (out / "submitit").glob(f"*/{job}/{job}_*_log.*")}
        text = "\n".join(logs.values())
        assert state() == "COMPLETED", text[-4000:]
    finally:
        slurm_cluster.run("scancel", job, check=False)
    # Each node was given a GPU (CUDA_VISIBLE_DEVICES=0) that no driver backs: the rank said so and
    # trained on the CPU; nothing on the submit host forced it (no ACCELERATE_USE_CPU / DS_ACCELERATOR).
    assert text.count("CUDA_VISIBLE_DEVICES=0) but this rank cannot use any") == 2, text[-4000:]
    assert "CPU fp32" in text and (out / "model.safetensors").exists()
