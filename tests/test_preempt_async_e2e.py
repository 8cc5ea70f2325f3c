"""Issue 19 item 18: between logging steps the preemption agreement is an all-reduce started without
waiting and read one step later (no blocking collective of distsft's own per step). A signal at such a
step still stops every rank at one step boundary, with a complete checkpoint, at most one step late,
and the rerun finishes the run."""
from __future__ import annotations

import signal

import pytest

import helpers as h
from distsft.checkpoint.preempt import EXIT_PREEMPTED
from distsft.checkpoint.store import MARKER

pytestmark = pytest.mark.slow
STEPS = 12


def test_a_signal_between_logging_steps_stops_all_ranks_within_a_step(tmp_path):
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    args = ["--gpus", "2", f"train.max_steps={STEPS}", "logging.logging_steps=4", "checkpoint.save_steps=4"]
    proc = h.start("run", spec, *args)
    h.wait_for_step(out, 4, proc)  # the first logged step; the next three steps do not log
    proc.send_signal(signal.SIGUSR1)
    text = proc.communicate(timeout=180)[0]
    assert proc.returncode == EXIT_PREEMPTED, text[-3000:]
    saved = sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*") if (p / MARKER).exists())
    assert saved and 4 < saved[-1] < STEPS, saved  # a preemption save after step 4, not the end of the run
    p = h.run("run", spec, *args, check=True)
    assert f"resuming from checkpoint-{saved[-1]}" in p.stdout
    logged = [m["step"] for m in h.metrics(out) if "loss" in m]
    assert logged == sorted(set(logged)) and logged[0] == 4 and logged[-1] == STEPS, logged  # each step once
