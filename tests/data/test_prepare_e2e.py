"""`distsft prepare`, plan's data figures, and the ranks' own build of a missing cache, end to end: real
processes (torchrun, 2 ranks over gloo), real files in different formats, several eval sets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import helpers as h

pytestmark = pytest.mark.slow


def _mixture_spec(tmp_path: Path, cache: Path) -> Path:
    from datasets import Dataset
    rows = [json.loads(x) for x in (h.ROOT / "examples" / "data" / "instruct.jsonl").read_text().splitlines() if x]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "instruct.parquet"))
    return _write(tmp_path / "spec.yaml", f"""
model: {{name_or_path: {h.TINY}}}
data:
  sources:
    - {{path: {h.TRAIN}, fraction: 0.25}}
    - {{path: {tmp_path / 'instruct.parquet'}, format: instruction, count: 150}}
  eval_sources:
    - {{path: {h.EVAL}, label: chat}}
  val_set_size: 40
  max_length: 256
  cache_dir: {cache}
train: {{per_device_train_batch_size: 2, global_batch_size: 8, learning_rate: 2.0e-3, max_steps: 4,
        eval_steps: 2, bf16: false}}
logging: {{logging_steps: 1}}
checkpoint: {{save_steps: 1000}}
output_dir: {tmp_path / 'run'}
""")


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_prepare_prints_figures_and_plan_reports_sources_and_eval_sets(tmp_path):
    spec = _mixture_spec(tmp_path, tmp_path / "cache")
    p = h.run("prepare", spec, check=True)
    assert "source " + str(h.TRAIN) in p.stdout and "eval set val: 40 examples" in p.stdout
    assert "eval set chat: 200 examples" in p.stdout
    built = sorted(x.name.split("-")[0] for x in (tmp_path / "cache").iterdir() if x.name != "index")
    assert built == ["eval", "train"]  # no temporary directory left behind
    plan = json.loads(h.run("plan", spec, "--json", check=True).stdout)
    assert [(s["path"], s["split"]) for s in plan["sources"]] == [(str(h.TRAIN), "train"),
                                                                 (str(tmp_path / "instruct.parquet"), "train")]
    # selection after fraction/count (500 + 150), less every copy of the 40 records held out for `val`
    # (count 150 of 100 records repeats some)
    assert 650 - 80 <= sum(s["examples"] for s in plan["sources"]) <= 650 - 40
    assert plan["eval_sets"] == [{"label": "val", "examples": 40}, {"label": "chat", "examples": 200}]
    assert plan["num_examples"] <= 610

    bad = h.run("prepare", spec, "data.sources=[{path: nope.parquet}]")
    # an override's relative path resolves from the working directory (the tests run distsft in ROOT)
    assert bad.returncode == 2 and f"data.sources[0] ({h.ROOT / 'nope.parquet'}): data file not found" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_ranks_build_a_missing_cache_per_node_and_log_each_eval_set(tmp_path):
    """No prepare before the ranks: local rank 0 builds, the other rank waits on the file system; eval
    logs eval_loss over both sets together and eval_<label>_loss for each."""
    cache = tmp_path / "cache"
    spec = _mixture_spec(tmp_path, cache)
    out = tmp_path / "run"
    h.run("render", spec, "--gpus", "2", "--out", out, check=True)
    assert not cache.exists()
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        str(h.ROOT / "launch" / "train.py"), str(out / "run.yaml")], capture_output=True,
                       text=True, env=h.env(), cwd=h.ROOT, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    both = p.stdout + p.stderr
    assert both.count("data cache is missing") == 2 and "rank 0: the train data cache is missing" in both
    assert "rank 1" not in both.split("data cache is missing")[0][-40:]
    evals = [m for m in h.metrics(out) if "eval_loss" in m]
    assert [m["step"] for m in evals] == [2, 4]
    for m in evals:
        lo, hi = sorted((m["eval_val_loss"], m["eval_chat_loss"]))
        assert lo <= m["eval_loss"] <= hi  # token-weighted mean of the two sets
    assert sorted(x.name.split("-")[0] for x in cache.iterdir() if x.name != "index") == ["eval", "train"]
