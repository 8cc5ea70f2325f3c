"""TensorBoard and W&B sinks: readable event files, one offline W&B run per output dir, no API key on disk."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

import helpers as h

from distsft.runtime import dist
from distsft.observe.metrics import MetricsWriter
from distsft.observe.sinks import WANDB_ID_FILE, make_sinks, scalar_tags
from distsft.config.spec import validate

FAKE_KEY = "f" * 20 + "0123456789abcdef0123"  # 40 characters, the length of a real W&B key


def _spec(out: Path, **logging):
    return validate({"model": {"name_or_path": "m"}, "data": {"train_files": ["t.jsonl"]},
                     "output_dir": str(out), "logging": logging})


RECORDS = [
    {"step": 1, "loss": 2.5, "learning_rate": 1e-4, "grad_norm": 1.5, "tokens_per_second": 100.0, "epoch": 0.1},
    {"step": 2, "loss": 2.0, "learning_rate": 2e-4, "grad_norm": 1.2, "tokens_per_second": 110.0, "epoch": 0.2},
    {"step": 2, "eval_loss": 2.2, "eval_tokens": 50.0, "train_eval_gap": 0.2},
    {"step": 2, "generations": [{"prompt": "Say hi", "completion": "hi | there\nfriend"}]},
    {"step": 2, "warning": "loss is not falling"},
]


def test_scalar_tags_split_train_and_eval():
    assert scalar_tags(RECORDS[0])["train/loss"] == 2.5
    assert scalar_tags(RECORDS[2]) == {"eval/loss": 2.2, "eval/tokens": 50.0, "eval/train_eval_gap": 0.2}
    assert scalar_tags(RECORDS[3]) == {}


def test_tensorboard_scalars_and_text_read_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    w = MetricsWriter(tmp_path, ["jsonl", "tensorboard"], resume_step=0, spec=_spec(tmp_path))
    for r in RECORDS + [{"step": 3, "loss": float("nan"), "grad_norm": float("inf")}]:
        w.write(r)
    w.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/loss"} <= set(tags["scalars"])
    loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert loss[:2] == [(1, 2.5), (2, 2.0)] and loss[2][0] == 3 and math.isnan(loss[2][1])
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("eval/loss")] == [(2, 2.2)]
    assert {"generations/text_summary", "warnings/text_summary"} <= set(tags["tensors"])
    text = acc.Tensors("generations/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "Say hi" in text and "hi \\| there<br>friend" in text


def test_tensorboard_resume_purges_steps_after_checkpoint(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    spec = _spec(tmp_path)
    (sink,) = make_sinks(["tensorboard"], tmp_path, spec)
    for step in (1, 2, 3):
        sink.write({"step": step, "loss": float(step)})
    sink.close()
    (sink,) = make_sinks(["tensorboard"], tmp_path, spec, resume_step=2)  # crashed after 3, resumed at 2
    sink.write({"step": 3, "loss": 30.0})
    sink.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_only_rank_zero_makes_sinks(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    dist.env.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="rank 0"):
            make_sinks(["tensorboard"], tmp_path, _spec(tmp_path))
    finally:
        monkeypatch.undo()
        dist.env.cache_clear()


def test_wandb_offline_one_run_per_job_and_no_api_key_on_disk(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_SILENT", "true")
    # A key pasted into the spec must not reach the W&B config either.
    spec = _spec(tmp_path, report_to=["wandb"], wandb_project="proj")
    spec.slurm.setup = [f"export WANDB_API_KEY={FAKE_KEY}"]

    w = MetricsWriter(tmp_path, spec.logging.report_to, resume_step=0, spec=spec)
    for r in RECORDS:
        w.write(r)
    w.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text().strip()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and run_id in runs[0].name

    # A resumed / requeued job (new writer on the same output dir) continues the same W&B run.
    w = MetricsWriter(tmp_path, spec.logging.report_to, resume_step=2, spec=spec)
    w.write({"step": 3, "loss": 1.5})
    w.close()
    assert (tmp_path / WANDB_ID_FILE).read_text().strip() == run_id
    assert list(tmp_path.glob("wandb_run_id*")) == [tmp_path / WANDB_ID_FILE]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(run_id in r.name for r in runs)

    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and FAKE_KEY.encode() in p.read_bytes()]
    assert leaked == []
    assert os.environ["WANDB_API_KEY"] == FAKE_KEY  # the environment is the key's only home


def test_run_name_names_the_tensorboard_subdirectory(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    spec = _spec(tmp_path, run_name="lr3e-4_r16")
    (sink,) = make_sinks(["tensorboard"], tmp_path, spec)
    sink.write(RECORDS[0])
    sink.close()
    assert [p.name for p in (tmp_path / "tensorboard").iterdir()] == ["lr3e-4_r16"]
    acc = EventAccumulator(str(tmp_path / "tensorboard" / "lr3e-4_r16"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 2.5)]


def test_wandb_run_name_entity_and_tags(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    spec = _spec(tmp_path, report_to=["wandb"], run_name="sweep-7", wandb_entity="my-team",
                 wandb_tags=["sft", "lora"])
    (sink,) = make_sinks(["wandb"], tmp_path, spec)
    assert sink.run.name == "sweep-7" and sink.run.entity == "my-team"
    assert set(sink.run.tags) == {"sft", "lora"}
    sink.write(RECORDS[0])
    sink.close()
    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")

    def blob() -> bytes:
        return b"".join(p.read_bytes() for p in run_dir.rglob("*.wandb"))
    # What `wandb sync` uploads. wandb's service process may still be writing the file when finish()
    # returns on a loaded machine (seen in CI: only its header); it is complete shortly after.
    h.wait_until(lambda: all(x in blob() for x in (b"sweep-7", b"my-team", b"lora")), 60, "the offline .wandb file")
    # Without a run name: the output directory's name, as before.
    (tmp_path / "x").mkdir()
    (other,) = make_sinks(["wandb"], tmp_path / "x", _spec(tmp_path / "x", report_to=["wandb"]))
    assert other.run.name == "x"
    other.close()
