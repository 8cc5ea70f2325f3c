"""Complete-or-absent checkpoints, retention, resume lookup, the output-dir lock, the signal flag."""

import os
import signal
import subprocess
import sys

import pytest

from distsft.checkpoint import store as ck
from distsft.checkpoint.lock import OutputLock
from distsft.checkpoint.preempt import PREEMPT_SIGNALS, PreemptionFlag
from distsft.errors import SpecError


def make(root, step, complete=True):
    p = root / f"checkpoint-{step}"
    p.mkdir()
    (p / "model.safetensors").write_text("x")
    if complete:
        ck.write_marker(p, ck.Marker(step=step))
    return p


def test_latest_complete_skips_partial_checkpoints(tmp_path):
    make(tmp_path, 10)
    make(tmp_path, 20)
    make(tmp_path, 30, complete=False)  # killed while writing
    assert ck.latest_complete(tmp_path).name == "checkpoint-20"
    assert ck.resolve_resume("auto", tmp_path).name == "checkpoint-20"
    assert ck.resolve_resume("never", tmp_path) is None
    with pytest.raises(SpecError, match="not a complete"):
        ck.resolve_resume(str(tmp_path / "checkpoint-30"), tmp_path)
    assert ck.latest_complete(tmp_path / "missing") is None


def test_rotation_never_removes_the_newest_complete_checkpoint(tmp_path):
    for s in (10, 20, 30):
        make(tmp_path, s)
    make(tmp_path, 5, complete=False)
    make(tmp_path, 40, complete=False)  # being written right now
    removed = {p.name for p in ck.rotate(tmp_path, keep=1)}
    assert removed == {"checkpoint-5", "checkpoint-10", "checkpoint-20"}
    assert sorted(p.name for _, p in ck.checkpoints(tmp_path)) == ["checkpoint-30", "checkpoint-40"]


def test_rotation_protects_the_best_checkpoint(tmp_path):
    for s in (10, 20, 30):
        make(tmp_path, s)
    ck.rotate(tmp_path, keep=1, protect={tmp_path / "checkpoint-10"})
    assert sorted(p.name for _, p in ck.checkpoints(tmp_path)) == ["checkpoint-10", "checkpoint-30"]


def test_marker_roundtrip(tmp_path):
    p = make(tmp_path, 7)
    assert ck.read_marker(p) == ck.Marker(step=7)
    assert not (p / (ck.MARKER + ".tmp")).exists()


def test_lock_refuses_a_second_holder_and_is_released_when_the_holder_dies(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from distsft.checkpoint.lock import OutputLock; "
        f"OutputLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SpecError, match="in use by a live job"):
            OutputLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = OutputLock(tmp_path)
    lock.acquire()  # the kernel released the dead holder's lock
    lock.release()


def test_preemption_flag_is_raised_by_each_signal():
    for s in PREEMPT_SIGNALS:
        old = {x: signal.getsignal(x) for x in PREEMPT_SIGNALS}
        try:
            flag = PreemptionFlag().install()
            assert not flag.raised
            os.kill(os.getpid(), s)
            assert flag.raised and flag.signum == s
        finally:
            for x, h in old.items():
                signal.signal(x, h)
