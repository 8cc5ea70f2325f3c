"""`distributed.sequence_parallel_size` end to end on 2 CPU processes over gloo: DeepSpeed ZeRO-3 with
Ulysses through accelerate, TRL's SFTTrainer, packed rows.

Four real runs are shared by all assertions (each costs ~a minute on 2 cores):
  sp1   2 processes, sequence_parallel_size 1 (data parallel 2), 4 steps, eval and a checkpoint at 2
  sp2   2 processes, sequence_parallel_size 2 (data parallel 1), the same global batch, same steps
  sp2to1  a copy of sp2 cut back to checkpoint-2, resumed at sequence_parallel_size 1
  sp1to2  a copy of sp1 cut back to checkpoint-2, resumed at sequence_parallel_size 2
A constant learning rate makes the cut-back runs' schedule the uninterrupted runs' schedule.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import helpers as h

pytestmark = pytest.mark.slow

STEPS = 4
EXTRA = """
distributed:
  backend: deepspeed
  zero_stage: 3
"""
ARGS = [f"train.max_steps={STEPS}", "train.eval_steps=2", "checkpoint.save_steps=2",
        "train.lr_scheduler_type=constant", "train.warmup_ratio=0", "train.learning_rate=2e-3"]


class Runs:
    def __init__(self, root: Path):
        self.root = root
        self._done: dict[str, Path] = {}

    def spec(self, name: str) -> Path:
        return h.write_spec(self.root / f"{name}.yaml", self.root / name, EXTRA)

    def get(self, name: str) -> Path:
        if name in self._done:
            return self._done[name]
        out = self.root / name
        if name in ("sp1", "sp2"):
            h.run("run", self.spec(name), "--gpus", "2", *ARGS,
                  f"distributed.sequence_parallel_size={name[-1]}", check=True)
        else:  # sp2to1 / sp1to2: resume the other layout's checkpoint-2 in a copy of its output dir
            src, sp = self.get(name[:3]), name[-1]
            shutil.copytree(src, out, ignore=shutil.ignore_patterns("checkpoint-4"))
            p = h.run("run", self.spec(name), "--gpus", "2", *ARGS, f"distributed.sequence_parallel_size={sp}",
                      check=True)
            assert "resuming from checkpoint-2" in p.stdout
        self._done[name] = out
        return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("seqpar"))


def _steps(out: Path) -> dict[int, dict]:
    return {m["step"]: m for m in h.metrics(out) if "loss" in m}


def _data(out: Path, split: str):
    from distsft.config.spec import load_spec
    from distsft.data.build import load_or_build
    from distsft.data.split import cache_root
    from distsft.train.tokens import load_tokenizer
    spec = load_spec(out / "run.yaml")
    ds, stats = load_or_build(spec, load_tokenizer(spec), split, cache_root(spec))
    return spec, ds, stats


def test_same_global_batch_same_samples_same_losses(runs: Runs) -> None:
    """micro 2 x accum 2 x 2 GPUs at sp 1 and micro 2 x accum 4 x (2 GPUs / 2) at sp 2: the same global
    batch of 8 rows, the same rows in each step, and the same token-weighted losses."""
    a, b = _steps(runs.get("sp1")), _steps(runs.get("sp2"))
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))
    for s in a:
        assert b[s]["batch_checksum"] == a[s]["batch_checksum"], s
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], abs=1e-4), (s, a[s]["loss"], b[s]["loss"])
        assert b[s]["loss_tokens"] == a[s]["loss_tokens"], s  # each label counted once across the group
        assert b[s]["tokens"] == a[s]["tokens"], s
    assert a[STEPS]["loss"] < a[1]["loss"]  # it trains, so matching later steps compares the gradients
    rec = [json.loads(x) for x in (runs.get("sp2") / "run_record.jsonl").read_text().splitlines()][-1]
    assert rec["sequence_parallel_size"] == 2 and rec["data_parallel_size"] == 1
    assert rec["gradient_accumulation_steps"] == 4 and rec["global_batch_size"] == 8


def test_first_step_loss_is_the_one_conversation_at_a_time_reference(runs: Runs) -> None:
    """Step 1 trains on the untouched model: its logged loss at sp 2 is the token-weighted loss of the
    step's rows with every conversation run alone -- no example saw its packed neighbours."""
    from transformers import AutoModelForCausalLM
    from distsft.data.sampler import GlobalOrder
    out = runs.get("sp2")
    spec, ds, stats = _data(out, "train")
    rows = GlobalOrder(stats["num_rows"], spec.train.global_batch_size, spec.train.seed).step_rows(0)
    model = AutoModelForCausalLM.from_pretrained(h.TINY, dtype=torch.float32).eval()
    total, count = h.packed_token_loss(model, (ds[r] for r in rows.tolist()))
    assert _steps(out)[1]["loss"] == pytest.approx(total / count, abs=1e-5)


def _straddling(ds, micro: int, sp: int) -> int:
    """Examples of the eval rows that cross a shard border of their batch (rows padded to the batch's
    longest, rounded up to a multiple of sp)."""
    from distsft.config.seqpar import padded_length
    n = 0
    for i in range(0, len(ds), micro):
        rows = [ds[j] for j in range(i, min(i + micro, len(ds)))]
        chunk = padded_length(max(len(r["input_ids"]) for r in rows), sp) // sp
        for r in rows:
            ends = torch.tensor(r["seq_lengths"]).cumsum(0)
            starts = ends - torch.tensor(r["seq_lengths"])
            n += int(((starts // chunk) != ((ends - 1) // chunk)).sum())
    return n


def test_eval_loss_under_sp_equals_the_one_conversation_at_a_time_reference(runs: Runs) -> None:
    """eval_loss at the last step (evaluated through Ulysses, each rank holding half of every row) equals
    the final model's loss over the eval conversations one at a time, with examples straddling the
    shard border."""
    from transformers import AutoModelForCausalLM
    out = runs.get("sp2")
    spec, ds, _ = _data(out, "eval")
    assert _straddling(ds, spec.train.per_device_train_batch_size, 2) > 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    total, count = h.packed_token_loss(model, ds)
    got = [m for m in h.metrics(out) if "eval_loss" in m and m["step"] == STEPS][-1]
    assert got["eval_loss"] == pytest.approx(total / count, abs=1e-5)


@pytest.mark.parametrize("name,ref", [("sp2to1", "sp2"), ("sp1to2", "sp1")])
def test_resume_across_layouts_continues_at_the_same_sample(runs: Runs, name: str, ref: str) -> None:
    want, got = _steps(runs.get(ref)), _steps(runs.get(name))
    assert sorted(got) == list(range(1, STEPS + 1))  # steps 1-2 from the copy, 3-4 from the resume
    for s in (3, 4):
        assert got[s]["batch_checksum"] == want[s]["batch_checksum"], s
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], abs=1e-3), (s, got[s]["loss"], want[s]["loss"])
    rec = [json.loads(x) for x in (runs.get(name) / "run_record.jsonl").read_text().splitlines()][-1]
    old, new = (2, 1) if name == "sp2to1" else (1, 2)
    assert rec["resumed_from"] == "checkpoint-2"
    assert rec["sequence_parallel_size"] == new and rec["resumed_sequence_parallel_size"] == old
