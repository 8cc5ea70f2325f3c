"""`distsft submit` against the real two-node SLURM cluster of slurm/local-cluster.sh (no mocks): a 2-node
and a 1-node × 2-rank job to completion, fast failure reports (bad data on the nodes, a rank killed),
bad input refused before anything is queued, no token on disk, and preemption on SLURM: USR2 →
checkpoint on every rank → requeue by rank 0 → resume → completion with each step logged once and the
uninterrupted run's losses, then slurm.max_requeues ending the job (exit 75) and a resubmission finishing it.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import helpers as h
from distsft.checkpoint.preempt import EXIT_PREEMPTED
from distsft.checkpoint.store import MARKER
from slurm_cluster import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STEPS = 20  # ~0.2 s a step on an idle machine: long enough to signal a job mid-training twice
FAKE_WANDB_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 hex characters, like a real key
FAKE_HF_TOKEN = "hf_fakeFAKEfake0123456789abcdefABCDEFghij"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The data cache the ranks share (both nodes are this machine, so any local path is shared)."""
    return tmp_path_factory.mktemp("slurm-data-cache")


def submit_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, DISTSFT_CACHE_DIR=str(cache_dir), PYTHONUNBUFFERED="1",
               OMP_NUM_THREADS="1")  # the two "nodes" share this machine's cores
    env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    for k in ("WANDB_API_KEY", "HF_TOKEN"):
        env.pop(k, None)
    env.update(extra)
    return env


def distsft(*args: object, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*h.DISTSFT, *map(str, args)], capture_output=True, text=True, env=env, cwd=h.ROOT,
                          timeout=timeout)


class Waiter:
    """`distsft submit ... --wait` in the background; its output collected line by line."""

    def __init__(self, *args: object, env: dict[str, str]):
        self.started = time.monotonic()
        self.proc = subprocess.Popen([*h.DISTSFT, "submit", *map(str, args), "--wait"], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env, cwd=h.ROOT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def text(self) -> str:
        return "".join(self.lines)

    @property
    def job_id(self) -> str:
        m = h.wait_until(lambda: re.search(r"submitted job (\d+)", self.text) or self._ended(), 60, "submission")
        if not isinstance(m, re.Match):
            raise AssertionError(f"submit ended (rc {self.proc.returncode}) without a job:\n{self.text}")
        return m.group(1)

    def _ended(self) -> bool:
        return self.proc.poll() is not None

    def wait(self, timeout: float = 240) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"--wait still running after {timeout} s:\n{self.text[-4000:]}") from None
        self._reader.join(timeout=10)
        return rc


def loss_records(out: Path) -> list[dict]:
    return [m for m in h.metrics(out) if "loss" in m]


def wait_for_step(out: Path, step: int, waiter: Waiter, timeout: float = 180) -> int:
    def reached() -> int:
        if waiter._ended():
            raise AssertionError(f"the job ended (rc {waiter.proc.returncode}) before step {step}:\n{waiter.text[-4000:]}")
        steps = [m["step"] for m in loss_records(out)]
        return max(steps) if steps and max(steps) >= step else 0
    return h.wait_until(reached, timeout, f"step {step} in {out}/metrics.jsonl")


def run_record(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "run_record.jsonl").read_text().splitlines() if x.strip()]


def queued(cluster: SlurmCluster, name: str) -> str:
    """Jobs named `name`, in the queue or in accounting."""
    return (cluster.run("squeue", "-h", "-n", name, "-o", "%i").stdout
            + cluster.run("sacct", "-n", "-X", "-P", "--name", name, "-o", "JobID").stdout).strip()


def assert_each_step_once(out: Path) -> list[dict]:
    recs = loss_records(out)
    assert [m["step"] for m in recs] == list(range(1, STEPS + 1))
    return recs


# ----------------------------------------------------------------------------------------- completed runs

@pytest.fixture(scope="module")
def two_node_run(slurm_cluster: SlurmCluster, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """2 nodes × 1 rank, with (fake) tokens in the submitting environment; the setup line fails the job
    unless they reached the nodes."""
    tmp = tmp_path_factory.mktemp("two-node")
    out = tmp / "run"
    spec = h.write_spec(tmp / "spec.yaml", out, "slurm:\n  time_min: 10\n  setup:\n"
                        "    - 'test -n \"$WANDB_API_KEY\" && test -n \"$HF_TOKEN\" || exit 3'\n")
    w = Waiter(spec, "--nodes", 2, "--gpus", 1, f"train.max_steps={STEPS}",
               env=submit_env(cache_dir, WANDB_API_KEY=FAKE_WANDB_KEY, HF_TOKEN=FAKE_HF_TOKEN))
    rc = w.wait()
    return rc, w, out


def test_two_node_job_runs_to_completion_with_rank_0_writing(two_node_run, slurm_cluster: SlurmCluster) -> None:
    rc, w, out = two_node_run
    assert rc == 0, w.text[-4000:]
    assert "RUNNING on n[1-2]" in w.text and f"step {STEPS}/{STEPS}" in w.text
    assert f"job {w.job_id} completed" in w.text
    (rec,) = run_record(out)  # written once, by rank 0
    assert (rec["world_size"], rec["num_nodes"], rec["writer_rank"], rec["restart_count"]) == (2, 2, 0, 0)
    assert rec["master_addr"] == "n1" and rec["job_id"] == w.job_id
    assert_each_step_once(out)
    assert (out / "model.safetensors").exists()
    folder = next((out / "submitit").glob(f"*/{w.job_id}"))
    # Rank 1 ran on the second node and printed no progress (rank 0 alone reports and writes metrics).
    assert "step 1/" not in (folder / f"{w.job_id}_1_log.out").read_text()
    nodes = h.wait_until(lambda: slurm_cluster.run("sacct", "-n", "-X", "-P", "-j", w.job_id, "-o", "NodeList")
                       .stdout.strip() == "n[1-2]", 20, "sacct NodeList n[1-2]")
    assert nodes


def test_no_token_in_any_file_under_the_output_dir(two_node_run) -> None:
    rc, w, out = two_node_run
    assert rc == 0, w.text[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.endswith("_submitted.pkl") for p in files) and any(p.suffix == ".sh" for p in files)
    leaked = [str(p) for p in files for token in (FAKE_WANDB_KEY, FAKE_HF_TOKEN) if token.encode() in p.read_bytes()]
    assert leaked == []
    assert FAKE_WANDB_KEY not in w.text and FAKE_HF_TOKEN not in w.text


# ------------------------------------------------------------------------------------------- preemption

def test_one_node_two_ranks_usr2_checkpoints_requeues_resumes_then_max_requeues_stops_and_a_resubmit_finishes(
        slurm_cluster: SlurmCluster, cache_dir: Path, two_node_run, tmp_path: Path) -> None:
    """1 node × 2 ranks (the other layout `--nodes/--gpus` can take), preempted twice, completed by a
    resubmission; its curve is the uninterrupted 2-node run's (same world size, batch and order)."""
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    args = (spec, "--nodes", 1, "--gpus", 2, f"train.max_steps={STEPS}", "slurm.max_requeues=1")
    w = Waiter(*args, env=submit_env(cache_dir))
    job = w.job_id
    wait_for_step(out, 3, w)
    slurm_cluster.run("scancel", "--signal=USR2", job)  # what SLURM sends signal_delay_s before the limit
    h.wait_until(lambda: len(run_record(out)) >= 2 if (out / "run_record.jsonl").exists() else False, 120,
               "the requeued job to start")
    first = run_record(out)[1]["resumed_from"]
    assert first and first.startswith("checkpoint-")
    stop1 = int(first.split("-")[1])
    ckpt = out / first
    # Every rank saved at that step boundary: one complete checkpoint with both ranks' RNG states.
    assert (ckpt / MARKER).exists() and {p.name for p in ckpt.glob("rng_state_*.pth")} == {"rng_state_0.pth",
                                                                                          "rng_state_1.pth"}
    wait_for_step(out, stop1 + 2, w)
    slurm_cluster.run("scancel", "--signal=USR2", job)  # second preemption: max_requeues=1 is used up
    rc = w.wait()
    assert rc == EXIT_PREEMPTED, w.text[-4000:]
    text = w.text
    assert f"requeued job {job} after checkpoint-{stop1}" in text
    assert f"job {job} was requeued (restart 1" in text and f"job {job} PENDING" in text
    assert "already requeued 1 time(s) (slurm.max_requeues=1); not requeued" in text
    assert "resubmit the same command to resume" in text.lower()
    assert text.count(f"job {job} RUNNING") == 2
    records = run_record(out)
    assert [(r["job_id"], r["restart_count"]) for r in records] == [(job, 0), (job, 1)]
    assert {(r["world_size"], r["num_nodes"], r["writer_rank"]) for r in records} == {(2, 1, 0)}
    # The same job's submitit folder served both runs: logs appended, one result per rank at the end.
    folder = next((out / "submitit").glob(f"*/{job}"))
    assert (folder / f"{job}_0_log.out").read_text().count("distsft: world size 2") == 2

    second = Waiter(*args, env=submit_env(cache_dir))
    assert second.wait() == 0, second.text[-4000:]
    assert second.job_id != job
    records = run_record(out)
    assert [r["restart_count"] for r in records] == [0, 1, 0]
    stop2 = int(records[2]["resumed_from"].split("-")[1])
    assert stop1 < stop2 < STEPS
    # Each step logged once, and the curve is the uninterrupted run's (same world size and order).
    assert two_node_run[0] == 0
    straight = {m["step"]: m for m in loss_records(two_node_run[2])}
    for m in assert_each_step_once(out):
        assert m["batch_checksum"] == straight[m["step"]]["batch_checksum"], m["step"]
        assert abs(m["loss"] - straight[m["step"]]["loss"]) <= 1e-5, (m["step"], m["loss"], straight[m["step"]]["loss"])


# --------------------------------------------------------------------------------------------- failures

def test_bad_data_on_the_nodes_is_reported_within_a_minute(slurm_cluster: SlurmCluster, cache_dir: Path,
                                                          tmp_path: Path) -> None:
    lines = h.TRAIN.read_text().splitlines()
    bad = tmp_path / "train.jsonl"
    bad.write_text("\n".join(lines[:20] + ['{"messages": [oops'] + lines[20:40]) + "\n")
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "run")
    t0 = time.monotonic()
    # --no-prepare: the submit command does not read the data; the ranks do, on the nodes (without it,
    # submit fails on this host with exit 2 before queuing: tests/test_prepare_slurm_e2e.py).
    # eval.after_training too: its afterok job is queued with the training job and never runs after a failure.
    p = distsft("submit", spec, "--nodes", 2, "--gpus", 1, "--wait", "--no-prepare", f"data.train_files={bad}",
                "eval.tasks=[tiny_arith]", f"eval.include_path={h.ROOT / 'examples' / 'eval_tasks'}",
                "eval.after_training=true", env=submit_env(cache_dir), timeout=120)
    assert time.monotonic() - t0 < 60, p.stdout[-2000:]
    assert p.returncode == 2, p.stdout[-3000:] + p.stderr[-3000:]
    assert "ended FAILED" in p.stderr
    assert f"[rank 0] error: data.train_files[0]: {bad}:21: not valid JSON" in p.stderr, p.stderr
    eval_job = re.search(r"eval job (\d+): lm-eval on the final model after job (\d+) succeeds", p.stdout)
    assert eval_job, p.stdout[-2000:]
    state = ""
    for _ in range(30):  # kill-on-invalid-dep: SLURM cancels it once the training job has failed
        state = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "State", "-j", eval_job.group(1)],
                               capture_output=True, text=True, env=submit_env(cache_dir)).stdout.strip()
        if state and state not in ("PENDING",):
            break
        time.sleep(1)
    assert state.startswith("CANCELLED"), state
    assert not (tmp_path / "run" / "eval").exists()


def test_a_rank_killed_ends_the_job_within_a_minute(slurm_cluster: SlurmCluster, cache_dir: Path,
                                                    tmp_path: Path) -> None:
    import psutil
    out = tmp_path / "run"
    w = Waiter(h.write_spec(tmp_path / "spec.yaml", out), "--nodes", 2, "--gpus", 1, "train.max_steps=400",
               env=submit_env(cache_dir))
    job = w.job_id
    wait_for_step(out, 2, w)

    def rank_1() -> psutil.Process | None:
        for p in psutil.process_iter(["cmdline"]):
            try:
                if "submitit.core._submit" in " ".join(p.info["cmdline"] or []) and \
                        p.environ().get("SLURM_JOB_ID") == job and p.environ().get("SLURM_PROCID") == "1":
                    return p
            except psutil.Error:
                continue
        return None

    victim = h.wait_until(rank_1, 10, "rank 1's process")
    t0 = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    rc = w.wait(timeout=90)
    assert time.monotonic() - t0 < 60
    assert rc == 1, w.text[-3000:]
    assert f"job {job} ended FAILED" in w.text
    assert "task 1: Killed" in w.text  # srun's word on which rank died, in the tail shown
    assert slurm_cluster.run("squeue", "-h", "-j", job, check=False).stdout.strip() == ""


# ------------------------------------------------------------------------------------------- bad input

def test_no_sbatch_on_path_points_to_run_and_the_local_cluster(cache_dir: Path, tmp_path: Path) -> None:
    env = submit_env(cache_dir)
    env["PATH"] = str(tmp_path / "empty")
    p = distsft("submit", h.write_spec(tmp_path / "spec.yaml", tmp_path / "run"), "--nodes", 2, "--gpus", 1,
                env=env, timeout=60)
    assert p.returncode == 2
    msg = " ".join(p.stderr.split())
    assert "no `sbatch` on PATH" in msg and "distsft run" in msg and "slurm/local-cluster.sh" in msg
    assert len(p.stderr.strip().splitlines()) <= 3  # one message (wrapped at most)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("option,expected", [
    (("--partition", "nosuchpart"), "sbatch refused the job: invalid partition specified: nosuchpart"),
    (("--account", "nosuchacct"), "slurm.account=nosuchacct"),
])
def test_unknown_partition_or_account_is_one_line_exit_2(slurm_cluster: SlurmCluster, cache_dir: Path,
                                                          tmp_path: Path, option, expected) -> None:
    name = f"distsft-bad-{os.getpid()}-{option[0][2:]}"
    p = distsft("submit", h.write_spec(tmp_path / "spec.yaml", tmp_path / "run"), *option,
                f"slurm.job_name={name}", env=submit_env(cache_dir), timeout=60)
    assert p.returncode == 2, p.stdout + p.stderr
    assert expected in " ".join(p.stderr.split())
    assert len(p.stderr.strip().splitlines()) <= 3 and "Traceback" not in p.stderr
    assert queued(slurm_cluster, name) == ""
    assert list((tmp_path / "run" / "submitit").glob("*/*")) == []


def test_indivisible_batch_stops_before_anything_is_queued(slurm_cluster: SlurmCluster, cache_dir: Path,
                                                            tmp_path: Path) -> None:
    name = f"distsft-indivisible-{os.getpid()}"
    before = slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split()
    p = distsft("submit", h.write_spec(tmp_path / "spec.yaml", tmp_path / "run"), "--nodes", 1, "--gpus", 3,
                "--wait", f"slurm.job_name={name}", env=submit_env(cache_dir), timeout=60)
    assert p.returncode == 2
    assert "not divisible" in p.stderr and "nearest valid global batch sizes" in p.stderr
    assert slurm_cluster.run("squeue", "-h", "-o", "%i").stdout.split() == before
    assert queued(slurm_cluster, name) == ""
    assert not (tmp_path / "run").exists()


def test_dry_run_prints_the_script_and_rank_command_without_submitting(slurm_cluster: SlurmCluster, cache_dir: Path,
                                                                       tmp_path: Path) -> None:
    name = f"distsft-dry-{os.getpid()}"
    out = tmp_path / "run"
    p = distsft("submit", h.write_spec(tmp_path / "spec.yaml", out), "--nodes", 2, "--gpus", 2, "--dry-run",
                "train.global_batch_size=16", f"slurm.job_name={name}", env=submit_env(cache_dir), timeout=60)
    assert p.returncode == 0, p.stderr
    for line in ("#!/bin/bash", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", f"#SBATCH --job-name={name}",
                 "#SBATCH --requeue", "#SBATCH --signal=USR2@120", "#SBATCH --open-mode=append"):
        assert line in p.stdout
    assert re.search(r"^srun .*--kill-on-bad-exit=1 .*-m submitit\.core\._submit ", p.stdout, re.M)
    assert f"-m distsft.train {out}/run.yaml" in p.stdout and "RANK=$SLURM_PROCID" in p.stdout
    assert queued(slurm_cluster, name) == "" and not out.exists()


@pytest.mark.parametrize("override", ["slurm.partition=debug;reboot", "slurm.job_name=x$(id)", "slurm.job_name=a`id`"])
def test_shell_metacharacters_in_slurm_names_are_refused(cache_dir: Path, tmp_path: Path, override: str) -> None:
    p = distsft("submit", h.write_spec(tmp_path / "spec.yaml", tmp_path / "run"), override, "--dry-run",
                env=submit_env(cache_dir), timeout=60)
    assert p.returncode == 2 and p.stdout == ""
    assert f"slurm.{override.split('=')[0].split('.')[1]}" in p.stderr and "a shell would interpret" in p.stderr
