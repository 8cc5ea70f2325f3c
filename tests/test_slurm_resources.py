"""What a SLURM job asks for (launch.slurm_resources): CPUs per rank, memory per node and GPUs, derived
from the partition's nodes and the model when the spec does not say; and the preemption window check
(plan.preempt_window) against the checkpoint size the plan computes."""

from __future__ import annotations

import pytest

import helpers as h
from distsft.config.spec import load_spec
from distsft.errors import SpecError
from distsft.launch import slurm_resources as sr
from distsft.plan import preempt_window

SINFO = "128 1031000 gpu:a100:8(S:0-1)\n96 515000 gpu:8\n"


def _spec(tmp_path, extra=""):
    return load_spec(h.write_spec(tmp_path / "s.yaml", tmp_path / "out", extra))


def test_sinfo_lines_give_the_smallest_node():
    node = sr.parse_sinfo(SINFO)
    assert node == sr.NodeInfo(cpus=96, mem_mb=515000, gpus=8)
    assert sr.gres_gpus("gpu:2,shard:4") == 2 and sr.gres_gpus("(null)") == 0
    assert sr.parse_sinfo("") is None


def test_defaults_derived_from_the_node_and_the_gpu_count(tmp_path):
    spec = _spec(tmp_path, "distributed:\n  nodes: 2\n  gpus_per_node: 4\n")
    res = sr.resources(spec, sr.parse_sinfo(SINFO), need_gb=40)
    assert res["gpus_per_node"] == 4
    assert res["cpus_per_task"] == 96 // 4  # the node's CPUs shared by its ranks, not 1 each
    assert res["mem"] == f"{515000 // 1024 // 2}GB"  # half the node for half its GPUs


def test_memory_at_least_what_loading_needs_and_never_more_than_the_node(tmp_path):
    spec = _spec(tmp_path, "distributed:\n  gpus_per_node: 1\n")
    small = sr.NodeInfo(cpus=16, mem_mb=64 * 1024, gpus=8)
    assert sr.resources(spec, small, need_gb=30)["mem"] == "30GB"  # 1/8 of 64 GB is too little
    res = sr.resources(spec, small, need_gb=500)
    assert res["mem"] == "64GB" and any("more than" in n for n in res["notes"])


def test_explicit_values_win_and_gpus_follow_request_gpus(tmp_path):
    spec = _spec(tmp_path, "slurm:\n  cpus_per_task: 3\n  mem_gb: 7\n  request_gpus: false\n")
    res = sr.resources(spec, sr.parse_sinfo(SINFO), need_gb=100)
    assert (res["cpus_per_task"], res["mem"], "gpus_per_node" in res) == (3, "7GB", False)
    cpu_nodes = sr.NodeInfo(cpus=8, mem_mb=32000, gpus=0)
    assert "gpus_per_node" not in sr.resources(_spec(tmp_path), cpu_nodes, None)
    forced = _spec(tmp_path, "slurm:\n  request_gpus: true\n")
    assert sr.resources(forced, cpu_nodes, None)["gpus_per_node"] == 1  # GPU nodes without a gpu GRES


def test_without_sinfo_fixed_defaults_still_request_cpus_and_memory(tmp_path):
    res = sr.resources(_spec(tmp_path, "distributed:\n  gpus_per_node: 2\n"), None, need_gb=None, dry_run=True)
    assert res["cpus_per_task"] == sr.DEFAULT_CPUS_PER_RANK
    assert res["mem"] == f"{2 * 2 * sr.RANK_OVERHEAD_GB}GB" and res["gpus_per_node"] == 2


def test_host_memory_counts_one_copy_when_rank_0_loads(tmp_path):
    fsdp = _spec(tmp_path, "distributed:\n  backend: fsdp\n  gpus_per_node: 8\n")
    ddp = _spec(tmp_path, "distributed:\n  gpus_per_node: 8\n")
    assert sr.load_copies(fsdp) == 1 and sr.load_copies(ddp) == 8
    n = 8_000_000_000
    assert sr.host_need_gb(n, sr.load_bytes(fsdp), 1, 8) < sr.host_need_gb(n, sr.load_bytes(ddp), 8, 8)


def test_dry_run_prints_cpus_memory_and_gpus(tmp_path):
    spec = h.write_spec(tmp_path / "s.yaml", tmp_path / "out")
    p = h.run("submit", spec, "--nodes", "2", "--gpus", "2", "--dry-run", check=True)
    for line in ("#SBATCH --cpus-per-task=", "#SBATCH --mem=", "#SBATCH --gpus-per-node=2"):
        assert line in p.stdout, p.stdout


def test_checkpoint_that_cannot_fit_the_usr2_window_is_refused(tmp_path):
    # An 8B full fine-tune on one node: ~96 GB per save, ~103 s at the assumed 1 GB/s (x1.5 > 120 s),
    # ~21 s on a fast file system: a warning with the value to set.
    warn, err = preempt_window.check(_spec(tmp_path), {"per_node_gb": 96.0, "backend": "fsdp"})
    assert err is None and "slurm.signal_delay_s=160" in warn and "checkpoint_write_gbps" in warn
    # 70B on one node: ~780 GB per save does not fit 120 s even at 5 GB/s: refused.
    warn, err = preempt_window.check(_spec(tmp_path), {"per_node_gb": 780.0, "backend": "fsdp"})
    assert warn is None and "slurm.signal_delay_s=" in err
    # The file system's own speed, given: not fitting is an error.
    slow = _spec(tmp_path, "slurm:\n  checkpoint_write_gbps: 0.5\n")
    assert "slurm.signal_delay_s=" in preempt_window.check(slow, {"per_node_gb": 60.0, "backend": "fsdp"})[1]
    fits = _spec(tmp_path, "slurm:\n  signal_delay_s: 600\n")
    assert preempt_window.check(fits, {"per_node_gb": 96.0, "backend": "fsdp"}) == (None, None)


def test_submit_refuses_a_window_too_short_for_the_checkpoint(tmp_path, monkeypatch):
    from distsft.launch import slurm
    spec = _spec(tmp_path, "slurm:\n  signal_delay_s: 1\n  checkpoint_write_gbps: 0.001\n")
    with pytest.raises(SpecError, match="signal_delay_s"):
        slurm.preemption_window(spec, {"checkpoint": {"per_node_gb": 1.0, "backend": "ddp"}})


def test_sbatch_template_requests_cpus_and_memory_and_shares_them_among_workers(tmp_path):
    import re
    import subprocess
    text = (h.ROOT / "slurm" / "sbatch_template.sh").read_text()
    assert re.search(r"^#SBATCH --cpus-per-task=\d+", text, re.M) and re.search(r"^#SBATCH --mem=", text, re.M)
    line = next(ln for ln in text.splitlines() if ln.startswith("OMP_NUM_THREADS="))
    out = subprocess.run(["bash", "-c", f"GPUS=8; SLURM_CPUS_PER_TASK=64; {line}; echo $OMP_NUM_THREADS"],
                         capture_output=True, text=True).stdout.strip()
    assert out == "8"
