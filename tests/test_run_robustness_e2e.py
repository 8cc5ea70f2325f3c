"""Issue 14 through a real `distsft run` (2 CPU ranks over gloo): a quiet console, a bound rendezvous
port skipped and announced, a stale incomplete checkpoint-N replaced by the save into it, and a
resume with another max_length / packing / backend / data refused before any rank starts."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest

import helpers as h
from distsft.checkpoint.store import MARKER, read_marker

pytestmark = pytest.mark.slow

NOISE = ("Failed to load CPU gemm_4bit_forward", "Loading weights", "Writing model shards", "it/s]",
         "is already in use", "standalone", "Traceback", "UserWarning", "FutureWarning")


def test_quiet_run_bound_port_stale_checkpoint_then_resume_guards(tmp_path: Path) -> None:
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    stale = out / "checkpoint-2" / "global_step2"
    stale.mkdir(parents=True)  # an earlier attempt died while saving step 2 (at another world size)
    (stale / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_text("stale shard")
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        port = s.getsockname()[1]
        p = h.run("run", spec, "--gpus", "2", "train.max_steps=4", "checkpoint.save_steps=2",
                  f"distributed.main_process_port={port}", timeout=600)
    text = p.stdout + p.stderr
    assert p.returncode == 0, text[-5000:]
    assert f"port {port} is in use on this machine; the ranks rendezvous on port" in text
    assert [n for n in NOISE if n in text] == [], text
    assert "run complete" in p.stdout and "step 4/4" in p.stdout
    # The save into checkpoint-2 started from an empty directory.
    assert (out / "checkpoint-2" / MARKER).exists()
    assert not (out / "checkpoint-2" / "global_step2").exists()
    m = read_marker(out / "checkpoint-4")
    assert m.max_length == 256 and m.packing is True and m.data_key.startswith("train-")

    def refused(*overrides: str) -> str:
        r = h.run("run", spec, "--gpus", "2", "train.max_steps=6", *overrides, timeout=300)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
        assert "Traceback" not in r.stderr and "launching" not in r.stdout  # before any rank started
        assert "checkpoint.resume=never" in r.stderr
        return " ".join(r.stderr.split())

    assert "data.max_length was 256, now 512" in refused("data.max_length=512")
    assert "data.packing was True, now False" in refused("data.packing=false")
    assert "distributed.backend was 'ddp', now 'deepspeed'" in refused("distributed.backend=deepspeed")
    fewer = tmp_path / "train.jsonl"
    fewer.write_text("\n".join(h.TRAIN.read_text().splitlines()[:-50]) + "\n")
    assert "trained on other data" in refused(f"data.train_files=[{fewer}]")


def test_ranks_started_without_the_launcher_report_too_little_data_once(tmp_path: Path) -> None:
    """torchrun on the rendered run dir (as under the sbatch template): rank 0 says it, every rank exits 2."""
    import subprocess
    import sys
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(h.TRAIN.read_text().splitlines()[:6]) + "\n")
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "run")
    run_dir = tmp_path / "rendered"
    h.run("render", spec, "--gpus", "2", f"data.train_files=[{small}]", "train.max_steps=3", "--out", run_dir,
          check=True)
    env = dict(h.env(), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(h.ROOT / "launch" / "train.py"), str(run_dir / "run.yaml")],
                       capture_output=True, text=True, env=env, cwd=h.ROOT, timeout=300)
    assert p.returncode != 0
    text = p.stdout + p.stderr
    assert text.count("fewer than one global batch of 8") == 1, text[-4000:]
    assert "[rank 0] error: the training data has" in text and "ValueError" not in text
    assert "exitcode  : 2" in text or "exit code 2" in text or "exitcode: 2" in text, text[-3000:]
