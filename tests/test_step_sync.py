"""Issue 19 items 14 and 18: the logging window counts rows (not micro-batches), keeps eval, saves,
generation and a compile warm-up out of the throughput clock, and is read once per logging step;
the preemption agreement adds no blocking collective of its own. Multi-rank agreement runs in the
preemption e2e tests; here the window's arithmetic with a clock the test moves."""
from __future__ import annotations

import pytest
import torch

from distsft.train.step_sync import PreemptionAgreement, StepWindow


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


class Flag:
    raised = False


def test_rows_tokens_and_loss_over_a_window():
    clock = Clock()
    w = StepWindow(torch.device("cpu"), clock=clock)
    for step in (0, 0, 1, 1):  # two steps of two micro-batches; flash attention packs each into one [1, T] row
        w.add(step, torch.tensor(6.0), loss_tokens=3, real_tokens=50, rows=4, checksum=7)
        clock.t += 1.0
    m, preempt = w.reduce(2, preempt=False, peak_memory_gb=1.5)
    assert not preempt
    assert m["loss"] == pytest.approx(24.0 / 12)
    assert m["samples"] == 8 and m["tokens"] == 100 and m["loss_tokens"] == 6 and m["batch_checksum"] == 28
    assert m["tokens_per_second"] == pytest.approx(200 / 4.0) and m["step_time"] == pytest.approx(2.0)
    assert m["peak_memory_gb"] == 1.5


def test_paused_time_is_not_training_time():
    clock = Clock()
    w = StepWindow(torch.device("cpu"), clock=clock)
    w.add(0, torch.tensor(1.0), 1, 100, 1, 0)
    clock.t += 2.0
    with w.paused():  # an eval, a save or sample generation
        clock.t += 30.0
    clock.t += 5.0
    w.excluded += 5.0  # a save the trainer timed itself (_record_save)
    clock.t += 2.0
    m, _ = w.reduce(1, False, 0.0)
    assert m["step_time"] == pytest.approx(4.0) and m["tokens_per_second"] == pytest.approx(25.0)


def test_a_compile_warm_up_step_is_left_out_of_throughput_but_not_of_the_loss():
    clock = Clock()
    w = StepWindow(torch.device("cpu"), clock=clock)
    w.add(0, torch.tensor(9.0), 3, 100, 2, 0)
    clock.t += 60.0  # compilation
    w.restart_timing(1)
    first, _ = w.reduce(1, False, 0.0)  # logged at step 1: loss yes, no throughput measured yet
    assert first["loss"] == 3.0 and "tokens_per_second" not in first and "step_time" not in first
    w.add(1, torch.tensor(2.0), 2, 80, 2, 0)
    clock.t += 0.5
    second, _ = w.reduce(2, False, 0.0)
    assert second["tokens_per_second"] == pytest.approx(160.0) and second["step_time"] == pytest.approx(0.5)


def test_the_window_reports_a_raised_flag_and_resets():
    w = StepWindow(torch.device("cpu"), clock=Clock())
    w.add(0, torch.tensor(1.0), 1, 1, 1, 0)
    _, preempt = w.reduce(1, preempt=True, peak_memory_gb=0.0)
    assert preempt
    m, _ = w.reduce(2, preempt=False, peak_memory_gb=0.0)
    assert m["samples"] == 0 and m["loss"] != m["loss"]  # reset: nothing since, NaN loss


def test_single_process_agreement_is_immediate_and_defers_to_the_logging_reduction():
    flag = Flag()
    a = PreemptionAgreement(flag)
    assert a.step_end(logging_now=False) is False
    flag.raised = True
    assert a.step_end(logging_now=True) is False  # the window's reduction carries the flag at this step
    assert a.step_end(logging_now=False) is True
    a.finish()


def test_extra_sums_ride_the_windows_one_collective(monkeypatch):
    """train.losses' per-window sums travel in the same gather as the window's (no collective of their
    own): each rank's vector is appended and the totals summed over the gathered rows."""
    from distsft.train import step_sync
    gathered = []

    def two_ranks(vec):  # the collective's contract: every rank's vector, in rank order
        gathered.append(vec.clone())
        other = vec.clone()
        other[-3:] = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
        return [vec.tolist(), other.tolist()]
    monkeypatch.setattr(step_sync, "gather_rows", two_ranks)
    w = StepWindow(torch.device("cpu"), clock=Clock())
    w.add(0, torch.tensor(6.0), loss_tokens=3, real_tokens=50, rows=4, checksum=7)
    m, _ = w.reduce(1, False, 0.0, extra=torch.tensor([10.0, 20.0, 30.0], dtype=torch.float64))
    assert len(gathered) == 1 and w.extra_total == [11.0, 22.0, 33.0]
    assert m["loss"] == pytest.approx(12.0 / 6)  # the window's own sums are unaffected
