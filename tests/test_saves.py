"""saves.py: the signal_delay_s budget of a checkpoint save (the e2e side is in test_sharded_peft_e2e.py)."""

from distsft.checkpoint.saves import SaveClock, budget_warning


def test_no_warning_while_a_save_and_a_step_fit_in_signal_delay():
    assert budget_warning(100.0, 19.0, 120) is None


def test_warning_names_the_value_to_set_with_headroom():
    msg = budget_warning(110.0, 118.0, 120)  # torchtune#2651's 8xH200 gather + optimizer times
    assert "slurm.signal_delay_s=120" in msg and "228.0 s" in msg
    assert msg.endswith("Set slurm.signal_delay_s=350")  # 1.5 x 228 s, rounded up to 10 s


class Writer:
    def __init__(self):
        self.records = []

    def write(self, record):
        self.records.append(record)


def test_every_save_is_logged_and_the_warning_comes_once():
    clock, w = SaveClock(signal_delay_s=1), Writer()
    for step in (10, 20, 30):
        clock.record(2.0, step, 0.5, w, device=None)  # one process: no collective
    assert [r for r in w.records if "save_seconds" in r] == [{"step": s, "save_seconds": 2.0} for s in (10, 20, 30)]
    assert [r["step"] for r in w.records if "warning" in r] == [10]
