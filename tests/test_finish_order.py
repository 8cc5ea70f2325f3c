"""The end of a run: after the final save, the ranks meet once; rank 0's adapter merge (minutes to an
hour at 70B) comes after that, so no rank waits for it in a collective that would time out and take
rank 0 down (tests/finish_worker.py: a merge longer than the collective timeout, on real gloo ranks)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import helpers as h

pytestmark = pytest.mark.slow


def test_rank_0_merges_after_the_last_collective(tmp_path):
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "out",
                        "peft:\n  method: lora\ncheckpoint:\n  save_steps: 1000\n  save_merged: true\n")
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29741", str(h.ROOT / "tests" / "finish_worker.py"), str(spec), str(out)],
                       capture_output=True, text=True, env=h.env(), timeout=300)
    results = {r: (out / f"rank{r}.txt").read_text() if (out / f"rank{r}.txt").exists() else None for r in (0, 1)}
    assert results == {0: "0", 1: "0"}, (results, p.stderr[-3000:])
    assert (out / "saved0").exists() and (out / "saved1").exists()
