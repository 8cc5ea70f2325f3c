"""Preemption and exact resume with real processes: signal → collective checkpoint → rerun → same losses."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import time

import pytest

import helpers as h
from distsft.checkpoint.preempt import EXIT_PREEMPTED
from distsft.checkpoint.store import MARKER

pytestmark = pytest.mark.slow
STEPS = 12


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The uninterrupted reference run: 12 steps on 2 processes."""
    tmp = tmp_path_factory.mktemp("straight")
    out = tmp / "run"
    h.run("run", h.write_spec(tmp / "spec.yaml", out), "--gpus", "2", f"train.max_steps={STEPS}", check=True)
    return {m["step"]: m for m in h.metrics(out) if "loss" in m}


def preempt_at(spec, out, step, gpus, sig=signal.SIGUSR1):
    proc = h.start("run", spec, "--gpus", gpus, f"train.max_steps={STEPS}")
    h.wait_for_step(out, step, proc)
    proc.send_signal(sig)
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_PREEMPTED, text[-3000:]
    assert "rerun the same command to resume" in text.lower()
    saved = sorted(out.glob("checkpoint-*"))
    assert saved and (saved[-1] / MARKER).exists()
    return int(saved[-1].name.split("-")[1])


def assert_same_run(out, straight, tol):
    recs = [m for m in h.metrics(out) if "loss" in m]
    steps = [m["step"] for m in recs]
    assert steps == list(range(1, STEPS + 1)), steps  # every step exactly once, in order
    for m in recs:
        ref = straight[m["step"]]
        assert m["batch_checksum"] == ref["batch_checksum"], m["step"]  # the same samples
        assert m["tokens"] == ref["tokens"], m["step"]  # per-step figures restart cleanly after a resume
        assert abs(m["loss"] - ref["loss"]) <= tol, (m["step"], m["loss"], ref["loss"])


def test_sigusr1_at_a_random_step_then_rerun_reproduces_the_uninterrupted_losses(tmp_path, straight):
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    step = random.Random(os.getpid()).randint(2, STEPS - 3)
    saved = preempt_at(spec, out, step, "2")
    assert saved >= step
    p = h.run("run", spec, "--gpus", "2", f"train.max_steps={STEPS}", check=True)
    assert f"resuming from checkpoint-{saved}" in p.stdout
    assert_same_run(out, straight, tol=1e-5)


def test_resume_on_another_process_count_keeps_global_batch_and_order(tmp_path, straight):
    """One output dir, 2 -> 1 -> 2 processes (SIGTERM, then SIGUSR1): the global batch, the samples of
    every step and the loss continue; accumulation is re-derived at each count."""
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    first = preempt_at(spec, out, 3, "2", sig=signal.SIGTERM)
    preempt_at(spec, out, first + 3, "1")
    h.run("run", spec, "--gpus", "2", f"train.max_steps={STEPS}", check=True)
    record = [json.loads(x) for x in (out / "run_record.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in record] == [2, 1, 2]
    assert {r["global_batch_size"] for r in record} == {8}
    assert [r["gradient_accumulation_steps"] for r in record] == [2, 4, 2]  # 8 = 2 per rank x accum x ranks
    # Same samples per step; the loss continues (summation order differs across process counts).
    assert_same_run(out, straight, tol=2e-4)


def test_partial_checkpoint_is_ignored(tmp_path, straight):
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    saved = preempt_at(spec, out, 3, "2")
    # What a kill -9 during a save leaves: a newer checkpoint directory without the completion marker.
    partial = out / f"checkpoint-{saved + 2}"
    shutil.copytree(out / f"checkpoint-{saved}", partial)
    (partial / MARKER).unlink()
    (partial / "model.safetensors").write_bytes(b"truncated")
    p = h.run("run", spec, "--gpus", "2", f"train.max_steps={STEPS}", check=True)
    assert f"resuming from checkpoint-{saved}" in p.stdout
    assert_same_run(out, straight, tol=1e-5)


def test_a_second_job_on_a_live_output_dir_is_refused(tmp_path):
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    proc = h.start("run", spec, "--gpus", "2", "train.max_steps=2000")
    try:
        h.wait_for_step(out, 1, proc)
        second = h.run("run", spec, "--gpus", "2")
        assert second.returncode == 2 and "in use by a live job" in second.stderr
        assert "Traceback" not in second.stderr
    finally:
        proc.send_signal(signal.SIGUSR1)
        text = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_PREEMPTED, text[-3000:]  # the live job was not disturbed


def test_kill_9_of_one_rank_ends_the_job_within_60s_naming_the_rank(tmp_path):
    import psutil
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    proc = h.start("run", spec, "--gpus", "2", "train.max_steps=400")
    h.wait_for_step(out, 2, proc)
    ranks = [p for p in psutil.Process(proc.pid).children(recursive=True)
             if "distsft.train" in " ".join(p.cmdline()) and "accelerate" not in " ".join(p.cmdline())]
    victim = next(p for p in ranks if p.environ().get("RANK") == "1")
    t0 = time.time()
    victim.send_signal(signal.SIGKILL)
    text = proc.communicate(timeout=90)[0]
    assert time.time() - t0 < 60
    assert proc.returncode not in (0, EXIT_PREEMPTED)
    assert "rank 1" in text.lower() or "local_rank: 1" in text


def test_disk_full_while_saving_is_a_clear_error_and_the_previous_checkpoint_survives(tmp_path):
    import subprocess
    mnt = tmp_path / "small"
    mnt.mkdir()
    # Room for one checkpoint of the tiny model (~1.8 MB) but not for a second one beside it.
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        out = mnt / "run"
        spec = h.write_spec(tmp_path / "spec.yaml", out)
        p = h.run("run", spec, "--gpus", "2", "train.max_steps=12", "checkpoint.save_steps=3",
                  "checkpoint.save_total_limit=1")
        text = p.stdout + p.stderr
        assert p.returncode not in (0, EXIT_PREEMPTED)
        assert "no space left while writing" in text and "checkpoint-3, is intact" in text
        assert (out / "checkpoint-3" / MARKER).exists()
        assert not (out / "checkpoint-6").exists()  # the partial one was removed, not left to load
        from safetensors.torch import load_file
        assert load_file(out / "checkpoint-3" / "model.safetensors")
    finally:
        subprocess.run(["umount", "-l", str(mnt)])
