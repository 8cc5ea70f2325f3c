"""Pillow plots: valid, non-blank PNGs of the expected size; the LR curve is the scheduler training uses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from PIL import Image

from distsft.observe import plots
from distsft.plan.report import make_plan
from distsft.config.spec import validate


def _spec(out: Path, **train):
    return validate({"model": {"name_or_path": "m"}, "data": {"train_files": ["t.jsonl"], "max_length": 512},
                     "output_dir": str(out), "train": train})


def _check_png(path: Path) -> None:
    with Image.open(path) as img:
        img.verify()  # a complete, uncorrupted PNG
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size == plots.SIZE
        colours = img.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 10  # axes, text and data, not a blank canvas


STATS = {"length_histogram": {"bin_edges": [8.0 + 10 * i for i in range(51)],
                              "counts": [int(100 * math.exp(-((i - 15) / 8) ** 2)) for i in range(50)]}}


def _steps(spec):
    p = make_plan(spec)
    return p.total_steps, p.warmup_steps


def test_plan_plots_write_lr_schedule_and_length_histogram(tmp_path):
    spec = _spec(tmp_path / "run", max_steps=200, warmup_ratio=0.1)
    written = plots.plan_plots(spec, *_steps(spec), STATS)
    assert written == [tmp_path / "run" / "lr_schedule.png", tmp_path / "run" / "length_histogram.png"]
    for p in written:
        _check_png(p)


def test_plan_plots_without_data_or_step_count(tmp_path):
    spec = _spec(tmp_path / "run")  # epochs, no data read: the step count is unknown
    assert plots.plan_plots(spec, *_steps(spec), None) == []
    spec = _spec(tmp_path / "run", max_steps=5)
    assert plots.plan_plots(spec, *_steps(spec), None) == [tmp_path / "run" / "lr_schedule.png"]


def _stepped(spec, total, warmup):
    """The learning rate each optimizer step runs at, stepping a scheduler as the trainer does."""
    import torch
    from transformers import get_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=spec.train.learning_rate)
    sched = get_scheduler(spec.train.lr_scheduler_type, opt, num_warmup_steps=warmup, num_training_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("sched", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                                   "constant_with_warmup", "inverse_sqrt"])
def test_lr_schedule_is_the_training_scheduler(tmp_path, sched):
    spec = _spec(tmp_path, learning_rate=1e-4, lr_scheduler_type=sched)
    lrs = plots.lr_schedule(spec, total_steps=100, warmup_steps=10)
    assert lrs == pytest.approx(_stepped(spec, 100, 10), rel=1e-12, abs=0)
    if sched in ("linear", "cosine", "cosine_with_restarts"):
        # step 1 runs at lr 0, the peak is reached after warmup, then it decays towards 0
        assert lrs[0] == 0 and lrs[10] == pytest.approx(1e-4) and 0 < lrs[-1] < 1e-5
        assert lrs[5] == pytest.approx(0.5e-4)
    elif sched == "constant":
        assert set(lrs) == {1e-4}
    _check_png(plots.lr_schedule_png(spec, 100, 10, tmp_path / "lr.png"))


def test_length_histogram_accepts_edges_key_and_skips_empty(tmp_path):
    stats = {"length_histogram": {"edges": [0, 100, 200], "counts": [3, 5]}}
    _check_png(plots.length_histogram_png(stats, 150, tmp_path / "h.png"))
    assert plots.length_histogram_png({"length_histogram": {"bin_edges": [], "counts": []}}, 8,
                                      tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_run_end_plots_loss_curves(tmp_path):
    records = [{"step": s, "loss": 3 * math.exp(-s / 30) + 0.5, "learning_rate": 1e-4} for s in range(1, 101)]
    records += [{"step": s, "eval_loss": 3 * math.exp(-s / 30) + 0.7} for s in (25, 50, 75, 100)]
    records += [{"step": 101, "loss": "nan"}, {"step": 50, "warning": "x"}]  # as metrics.jsonl stores them
    assert plots.run_end_plots(tmp_path, records) == [tmp_path / "loss_curves.png"]
    _check_png(tmp_path / "loss_curves.png")
    assert plots.run_end_plots(tmp_path / "empty", []) == []


@pytest.mark.parametrize("lo,hi,labels", [
    (0, 1000, ["0", "200", "400", "600", "800", "1000"]),
    (0.4, 3.7, ["0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5"]),
    (0, 2.16e-5, ["0", "5.0e-06", "1.0e-05", "1.5e-05", "2.0e-05"]),
])
def test_tick_labels(lo, hi, labels):
    ticks, step = plots.nice_ticks(lo, hi)
    assert [plots.fmt_tick(t, step) for t in ticks] == labels
