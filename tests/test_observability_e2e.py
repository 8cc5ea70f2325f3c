"""Rank-0 observability with real processes: one writer, one W&B run, TensorBoard, generations, plots,
NaN diagnostics, sanity."""

from __future__ import annotations

import pytest
from PIL import Image

import helpers as h

pytestmark = pytest.mark.slow
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


def test_two_ranks_one_writer_one_wandb_run_tensorboard_generations_and_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out, """
logging:
  logging_steps: 1
  report_to: [jsonl, tensorboard, wandb]
  generation_steps: 4
  generation_prompts: ["Reverse the word: cat", "What is 2 + 3?"]
""")
    h.run("run", spec, "--gpus", "2", "train.eval_steps=4", check=True)
    recs = h.metrics(out)
    steps = [r["step"] for r in recs if "loss" in r]
    assert steps == list(range(1, 9))  # one writer: each step once
    assert [r["step"] for r in recs if "eval_loss" in r] == [4, 8]
    gens = [r for r in recs if "generations" in r]
    assert [g["step"] for g in gens] == [4, 8] and len(gens[0]["generations"]) == 2
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1  # rank 1 never created a run
    run_id = (out / "wandb_run_id").read_text().strip()
    assert run_id in runs[0].name
    assert list((out / "tensorboard").rglob("events.out.tfevents.*"))
    for png in ("lr_schedule.png", "length_histogram.png", "loss_curves.png"):
        with Image.open(out / png) as im:
            im.verify()
    for f in out.rglob("*"):
        if f.is_file():
            assert FAKE_KEY.encode() not in f.read_bytes(), f
    # A rerun of the finished job keeps the same W&B run (resume and requeue reuse it).
    h.run("run", spec, "--gpus", "2", "train.max_steps=10", check=True)
    assert (out / "wandb_run_id").read_text().strip() == run_id
    assert [r["step"] for r in h.metrics(out) if "loss" in r] == list(range(1, 11))


def test_nan_loss_stops_without_saving_and_explains(tmp_path):
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    p = h.run("run", spec, "--gpus", "2", "train.learning_rate=1e6", "train.max_steps=30",
              "checkpoint.save_steps=1")
    assert p.returncode == 1
    text = (p.stdout + p.stderr).lower()
    assert "nan" in text and "learning rate" in text and "bf16" in text
    for ck in out.glob("checkpoint-*"):
        marker_losses = [r["loss"] for r in h.metrics(out) if r.get("step") == int(ck.name.split("-")[1]) and "loss" in r]
        assert all(x == x and abs(x) != float("inf") for x in marker_losses if isinstance(x, float))
