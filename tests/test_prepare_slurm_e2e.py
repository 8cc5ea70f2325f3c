"""`distsft submit` prepares the data on the submitting host before anything is queued (real SLURM cluster
of slurm/local-cluster.sh): bad data is exit 2 with nothing queued; good data is built here, and the
job's ranks memory-map it instead of building (no "cache is missing" on any rank)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import helpers as h
from slurm_cluster import SlurmCluster
from test_slurm_e2e import Waiter, distsft, queued, submit_env

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _spec(tmp_path: Path, parquet: Path, extra: str = "") -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(f"""
model: {{name_or_path: {h.TINY}}}
data:
  sources:
    - {{path: {h.TRAIN}, fraction: 0.2}}
    - {{path: {parquet}, format: instruction, count: 120}}
  eval_sources:
    - {{path: {h.EVAL}, label: chat}}
  val_set_size: 32
  max_length: 256
train: {{per_device_train_batch_size: 2, global_batch_size: 8, learning_rate: 2.0e-3, max_steps: 4,
        eval_steps: 4, bf16: false}}
logging: {{logging_steps: 1}}
checkpoint: {{save_steps: 1000}}
slurm: {{time_min: 10, job_name: distsft-prep-{os.getpid()}}}
output_dir: {tmp_path / 'run'}
{extra}""")
    return p


@pytest.fixture
def parquet(tmp_path: Path) -> Path:
    from datasets import Dataset
    rows = [json.loads(x) for x in (h.ROOT / "examples" / "data" / "instruct.jsonl").read_text().splitlines() if x]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "instruct.parquet"))
    return tmp_path / "instruct.parquet"


def test_bad_data_fails_on_the_submitting_host_and_nothing_is_queued(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                                    parquet: Path) -> None:
    spec = _spec(tmp_path, parquet)
    name = f"distsft-prep-{os.getpid()}"
    p = distsft("submit", spec, "--nodes", 2, "--gpus", 1, "--wait",  # instruction data read as chat:
                "data.sources=[{path: " + str(parquet) + "}]", env=submit_env(tmp_path / "cache"), timeout=120)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert f"data.sources[0] ({parquet}): no column 'messages'" in " ".join(p.stderr.split())
    assert "Traceback" not in p.stderr and "submitted job" not in p.stdout
    assert queued(slurm_cluster, name) == ""
    assert not (tmp_path / "run" / "submitit").exists()


def test_submit_prepares_here_and_the_ranks_find_the_caches(slurm_cluster: SlurmCluster, tmp_path: Path,
                                                           parquet: Path) -> None:
    cache = tmp_path / "cache"
    out = tmp_path / "run"
    w = Waiter(_spec(tmp_path, parquet), "--nodes", 2, "--gpus", 1, env=submit_env(cache))
    rc = w.wait(timeout=400)
    assert rc == 0, w.text[-4000:]
    text = w.text
    # the figures were printed before the job was queued
    assert text.index("eval set val: 32 examples") < text.index("submitted job")
    logs = "".join(p.read_text(errors="replace") for p in (out / "submitit").rglob("*_log.*"))
    assert logs and "cache is missing" not in logs
    evals = [m for m in h.metrics(out) if "eval_loss" in m]
    assert evals and {"eval_val_loss", "eval_chat_loss"} <= set(evals[-1])
    assert sorted(x.name.split("-")[0] for x in cache.iterdir() if x.name != "index") == ["eval", "train"]
