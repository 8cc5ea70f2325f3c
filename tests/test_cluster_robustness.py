"""Issue 14's fast checks: the output-dir lock on file systems without flock, resume guards, checkpoint
directories, rendezvous ports, the PREEMPTED flag's life cycle, and too little data for one batch."""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import helpers as h
from distsft.checkpoint import store as checkpoint, universal
from distsft.checkpoint import preempt
from distsft.runtime import ports
from distsft.checkpoint.resume import check_data_unchanged, check_resume_compatible
from distsft.checkpoint.lock import STALE_S, OutputLock
from distsft.plan.batch import batch_for, steps
from distsft.errors import SpecError
from distsft.config.spec import load_spec

SHIM = Path(__file__).parent / "shims" / "noflock"


# ------------------------------------------------------------------ 3. locks without flock

def _shim_env(**extra: str) -> dict[str, str]:
    env = h.env()
    env["PYTHONPATH"] = os.pathsep.join([str(SHIM), env.get("PYTHONPATH", "")])
    env.update(extra)
    return env


HOLD = "from distsft.checkpoint.lock import OutputLock; import sys, time; l = OutputLock(sys.argv[1]); l.acquire(); " \
       "print('held', flush=True); time.sleep(120)"


@pytest.mark.parametrize("code", ["ENOSYS", "ENOLCK"])
def test_without_flock_a_live_holder_refuses_a_second_run_with_its_host_pid_and_job(tmp_path: Path, code: str) -> None:
    """(Simulated: tests/shims/noflock makes flock fail as Lustre `noflock` / NFS `nolock` do.)"""
    out = tmp_path / "run"
    env = _shim_env(DISTSFT_TEST_FLOCK_ERRNO=code, SLURM_JOB_ID="4242")
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        owner = json.loads((out / ".distsft.lock.owner").read_text())
        assert owner["pid"] == holder.pid and owner["job_id"] == "4242" and owner["host"] == socket.gethostname()
        spec = h.write_spec(tmp_path / "spec.yaml", out)
        p = subprocess.run([*h.DISTSFT, "run", str(spec), "--gpus", "1"], capture_output=True, text=True,
                           env=_shim_env(DISTSFT_TEST_FLOCK_ERRNO=code), cwd=h.ROOT, timeout=120)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and "in use by a live job" in p.stderr
        assert f"host {socket.gethostname()}, pid {holder.pid}, SLURM job 4242" in p.stderr
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: same host, dead pid → stale, taken over.
    lock = OutputLock(out)
    p = subprocess.run([sys.executable, "-c", HOLD.replace("time.sleep(120)", "l.release()"), str(out)],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "held", p.stderr
    assert not lock.owner.exists()  # released


def _no_flock(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(fd: int, op: int) -> None:  # simulated: a file system that refuses flock
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_flock_another_hosts_holder_is_live_until_its_heartbeat_is_old(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    _no_flock(monkeypatch)
    out = tmp_path / "run"
    out.mkdir()
    owner = out / ".distsft.lock.owner"
    owner.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "job_id": "77", "time": time.time()}))
    with pytest.raises(SpecError, match="host node-elsewhere, pid 1, SLURM job 77"):
        OutputLock(out).acquire()
    old = time.time() - STALE_S - 60
    os.utime(owner, (old, old))  # its heartbeat stopped: the holder is gone
    lock = OutputLock(out)
    lock.acquire()
    assert json.loads(owner.read_text())["pid"] == os.getpid()
    with pytest.raises(SpecError, match="in use by a live job"):
        OutputLock(out).acquire()  # this process is alive on this host
    lock.release()
    assert not owner.exists()


def test_without_flock_an_earlier_attempt_of_the_same_job_is_taken_over(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A requeued job may start on another node within seconds; its own earlier attempt is not live."""
    _no_flock(monkeypatch)
    monkeypatch.setenv("SLURM_JOB_ID", "99")
    from distsft.runtime import dist
    dist.env.cache_clear()
    try:
        out = tmp_path / "run"
        out.mkdir()
        (out / ".distsft.lock.owner").write_text(json.dumps({"host": "n9", "pid": 1, "job_id": "99"}))
        lock = OutputLock(out)
        lock.acquire()
        lock.release()
    finally:
        dist.env.cache_clear()


# ------------------------------------------------------------------ 4. resume guards

def _spec(tmp_path: Path, *overrides: str):
    return load_spec(h.write_spec(tmp_path / "spec.yaml", tmp_path / "run"), list(overrides), gpus=2)


def _marker(spec) -> checkpoint.Marker:
    b = batch_for(spec)
    return checkpoint.Marker(global_batch_size=b.global_batch_size, seed=spec.train.seed, backend=spec.distributed.backend,
                             zero_stage=spec.distributed.stage, max_length=spec.data.max_length,
                             packing=spec.data.packing, data_key="train-abc", world_size=2, step=4)


@pytest.mark.parametrize("override,named", [
    ("data.max_length=512", "data.max_length was 256, now 512"),
    ("data.packing=false", "data.packing was True, now False"),
    ("distributed.backend=deepspeed", "distributed.backend was 'ddp', now 'deepspeed'"),
])
def test_resume_refuses_a_changed_layout_naming_it_and_the_way_out(tmp_path: Path, override: str, named: str) -> None:
    marker = _marker(_spec(tmp_path))
    changed = _spec(tmp_path, override)
    with pytest.raises(SpecError) as exc:
        check_resume_compatible(marker, changed, batch_for(changed))
    msg = str(exc.value)
    assert named in msg and "checkpoint.resume=never" in msg and f"Put it back ({override.split('=')[0]}=" in msg


def test_resume_refuses_another_zero_stage_but_not_another_world_size(tmp_path: Path) -> None:
    ds = _spec(tmp_path, "distributed.backend=deepspeed", "distributed.zero_stage=2")
    marker = _marker(ds)
    check_resume_compatible(dataclasses.replace(marker, world_size=4), ds, batch_for(ds))  # elastic resume stays allowed
    on_one = load_spec(h.write_spec(tmp_path / "spec.yaml", tmp_path / "run"),
                       ["distributed.backend=deepspeed", "distributed.zero_stage=2"], gpus=1)
    check_resume_compatible(marker, on_one, batch_for(on_one))
    z3 = _spec(tmp_path, "distributed.backend=deepspeed", "distributed.zero_stage=3")
    with pytest.raises(SpecError, match="distributed.zero_stage was 2, now 3"):
        check_resume_compatible(marker, z3, batch_for(z3))
    # A marker from before these fields were recorded resumes as before.
    old = checkpoint.Marker.from_dict({k: getattr(marker, k) for k in ("global_batch_size", "seed", "world_size", "step")})
    check_resume_compatible(old, z3, batch_for(z3))


def test_resume_refuses_other_data() -> None:
    check_data_unchanged(checkpoint.Marker(step=1, data_key="train-abc"), "train-abc")
    check_data_unchanged(checkpoint.Marker(step=1), "train-abc")
    with pytest.raises(SpecError, match="trained on other data.*checkpoint.resume=never"):
        check_data_unchanged(checkpoint.Marker(step=1, data_key="train-abc"), "train-def")


# ------------------------------------------------------------------ 5. checkpoint and temp directories

def test_clear_incomplete_removes_a_partial_checkpoint_only(tmp_path: Path) -> None:
    partial = tmp_path / "checkpoint-4"
    (partial / "global_step4").mkdir(parents=True)
    (partial / "global_step4" / "zero_pp_rank_3_mp_rank_00_optim_states.pt").write_text("stale")
    assert checkpoint.clear_incomplete(partial) and not partial.exists()
    done = tmp_path / "checkpoint-6"
    done.mkdir()
    checkpoint.write_marker(done, checkpoint.Marker(step=6))
    assert not checkpoint.clear_incomplete(done) and checkpoint.is_complete(done)
    assert [p.name for p in done.iterdir()] == [checkpoint.MARKER]  # no temporary file left behind


def test_conversion_temp_dirs_are_unique_and_spare_other_hosts(tmp_path: Path) -> None:
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    name = "global_step3_universal"
    # Another node's converter with the same pid (containers share pids) is working right now.
    other = ckpt / f".converting-{name}-othernode-{os.getpid()}-abcd"
    other.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine_dead = ckpt / f".converting-{name}-{socket.gethostname()}-{dead.pid}-wxyz"
    mine_dead.mkdir()
    a = universal.temp_dir(ckpt, name)
    b = universal.temp_dir(ckpt, name)
    assert a != b and a.is_dir() and b.is_dir() and other.is_dir()
    assert not mine_dead.exists()  # left by a dead converter on this host


# ------------------------------------------------------------------ 6. ports

def test_job_id_ports_stay_below_the_ephemeral_range() -> None:
    got = {ports.from_job_id(str(j)) for j in range(0, 100_000, 7)}
    assert min(got) >= 1024 and max(got) < ports.EPHEMERAL_START
    assert ports.from_job_id("12769") == ports.from_job_id("12769_3")  # array tasks share the job's port
    from distsft.runtime.ports import wanted
    assert wanted(job_id="12769") < 32768  # 20000 + 12769 % 20000 = 32769 before


def test_a_bound_port_is_skipped_and_announced_to_every_rank(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        taken = s.getsockname()[1]
        assert not ports.is_free(taken)
        code = ("import sys; from distsft.runtime.ports import agree_port; "
                "print(agree_port(sys.argv[1], '5', 0, int(sys.argv[2]), sys.argv[3] == '1', timeout_s=30))")
        others = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), str(taken), "0"], env=h.env(),
                                   stdout=subprocess.PIPE, text=True) for _ in range(2)]
        main = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(taken), "1"], env=h.env(),
                              capture_output=True, text=True, timeout=60)
        results = {main.stdout.strip()} | {o.communicate(timeout=60)[0].strip() for o in others}
    assert len(results) == 1, results
    port, moved = eval(results.pop())  # noqa: S307 - our own tuple
    assert moved and port != taken


# ------------------------------------------------------------------ 1. the PREEMPTED flag

def test_preempted_flag_life_cycle(tmp_path: Path) -> None:
    preempt.mark_preempted(tmp_path, 12)
    assert preempt.was_preempted(tmp_path) and preempt.preempted_step(tmp_path) == "12"
    preempt.clear_preempted(tmp_path)
    assert not preempt.was_preempted(tmp_path) and preempt.preempted_step(tmp_path) is None
    preempt.clear_preempted(tmp_path)  # idempotent


# ------------------------------------------------------------------ 8. too little data

def test_fewer_rows_than_one_global_batch_with_max_steps_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="10 rows .*fewer than one global batch of 64"):
        steps(10, 64, 1.0, 5)


def test_run_with_fewer_rows_than_a_global_batch_stops_before_the_ranks(tmp_path: Path) -> None:
    small = tmp_path / "small.jsonl"
    small.write_text("\n".join(h.TRAIN.read_text().splitlines()[:6]) + "\n")
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "run")
    p = h.run("run", spec, "--gpus", "2", f"data.train_files=[{small}]", "train.max_steps=3", timeout=180)
    assert p.returncode == 2, p.stdout + p.stderr
    assert "Traceback" not in p.stderr and "[rank" not in p.stderr and "launching" not in p.stdout
    assert "fewer than one global batch of 8" in p.stderr and "rows (after packing)" in p.stderr


# ------------------------------------------------------------------ 2. one resume decision for all ranks

AGREE = r"""
import json, sys
from pathlib import Path
from distsft.runtime import dist
from distsft.checkpoint.resume import decide as _resume_decision
from distsft.plan.batch import batch_for
from distsft.config.spec import load_spec
spec_path, out = sys.argv[1], Path(sys.argv[2])
dist.init_early(cuda=False)
spec = load_spec(spec_path, [f"output_dir={out}"], gpus=2)
resume, universal, marker = _resume_decision(spec, out, batch_for(spec), 2)
try:
    dist.agree(lambda: load_spec(spec_path, ["train.max_steps=0"]))
except dist.AgreedError as exc:
    err = str(exc)
print(json.dumps({"resume": str(resume), "step": marker.step, "err": err}), flush=True)
import torch.distributed
torch.distributed.destroy_process_group()  # exiting with a live gloo group may abort the process
"""


def test_every_rank_resumes_from_rank_0s_choice_whatever_its_own_view(tmp_path: Path) -> None:
    """Two real processes over gloo; rank 1's view of output_dir holds a newer checkpoint than rank 0's."""
    spec = h.write_spec(tmp_path / "spec.yaml", tmp_path / "unused")
    s = load_spec(spec, gpus=2)
    marker = dataclasses.replace(_marker(s), step=2)
    views = [tmp_path / "view0", tmp_path / "view1"]
    for view, steps_here in zip(views, ([2], [2, 6])):
        for step in steps_here:
            ckpt = view / f"checkpoint-{step}"
            ckpt.mkdir(parents=True)
            checkpoint.write_marker(ckpt, dataclasses.replace(marker, step=step))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, str(spec), str(views[r])], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              env=dict(h.env(), RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in (0, 1)]
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0, stderr
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    assert results[0] == results[1]
    assert results[0]["resume"] == str(views[0] / "checkpoint-2") and results[0]["step"] == 2
    assert "train.max_steps" in results[0]["err"]  # rank 0's error, raised on every rank
