"""`distsft submit`: one validated, planned job to SLURM through submitit.

Design: one SLURM task per rank (`ntasks_per_node = gpus_per_node`). Every rank is a process that SLURM
started itself (an srun task), so a pre-kill signal (USR2, `slurm.signal_delay_s` before the time limit,
or `scancel --signal=USR2`) reaches every rank directly — there is no launcher in between to lose it.
Each task learns its rank from SLURM (dist.env), the main address is the first host of the job's node
list, and the port is derived from the job id, so it is the same on every node and after a requeue.

srun runs with `--kill-on-bad-exit=1`: when one rank dies (crash, OOM kill, bad data) SLURM ends the
others instead of leaving them blocked in a collective, and the job ends FAILED at once.

Preemption: a rank that gets USR2/TERM/INT/USR1 raises the training's preemption flag; ranks agree on it
at the next step, all save one complete checkpoint and job.run returns 75. Then rank 0 decides, for all
ranks: after USR2 (time limit near, or a test's `scancel --signal=USR2`) it requeues the job with
submitit's requeue call (`scontrol requeue`: same job id, SLURM_RESTART_COUNT + 1, logs appended) unless
the job was already requeued `slurm.max_requeues` times; the requeued job resumes from the checkpoint
(checkpoint.resume=auto). After TERM alone (plain `scancel`, or a scheduler that requeues preempted jobs
itself) it does not requeue. Without a requeue the job ends FAILED and `--wait` exits 75 ("resubmit the
same command to resume").
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from . import checkpoint
from .checkpoint import EXIT_PREEMPTED, PREEMPT_SIGNALS
from .spec import RunSpec, SpecError, load_spec

SUBMITIT_DIR = "submitit"
REQUEUE_SIGNAL = signal.SIGUSR2  # SLURM's --signal=USR2@delay, and submitit's preemption signal
SRUN_ARGS = ["--kill-on-bad-exit=1"]
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}
_QUIET = ("submitit INFO", "submitit ERROR", "submitit WARNING")  # submitit's own log lines, left out of the followed log
_RANK_FAILED = re.compile(r"RankFailed: rank (\d+) exited with code (\d+)")


def rendezvous_port(job_id: str) -> int:
    """Same on every node and across requeues (the job id survives a requeue)."""
    digits = "".join(c for c in str(job_id).split("_")[0] if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


# ----------------------------------------------------------------------------------------------- ranks

class RankFailed(RuntimeError):
    """A rank's job.run ended with a non-zero code; submitit pickles it as the task's error, and the
    waiter reads the code back from there (2: bad spec/data, 75: preempted and not requeued)."""

    def __init__(self, rank: int, code: int, why: str = ""):
        super().__init__(f"rank {rank} exited with code {code}" + (f": {why}" if why else ""))
        self.rank, self.code = rank, code

    def __reduce__(self) -> Any:
        return (RankFailed, (self.rank, self.code))


class _SlurmFlag(checkpoint.PreemptionFlag):
    """The training's preemption flag, recording which signals arrived (the requeue decision depends on
    it) and taking over a signal that arrived before training installed its handlers (during imports),
    so the run still stops, with a checkpoint, at its first step."""

    seen: set[int] = set()

    def install(self) -> "_SlurmFlag":
        super().install()
        if _SlurmFlag.seen and self.signum is None:
            self.signum = REQUEUE_SIGNAL if REQUEUE_SIGNAL in _SlurmFlag.seen else min(_SlurmFlag.seen)
        return self

    def _handler(self, signum: int, frame: Any) -> None:
        _SlurmFlag.seen.add(signum)
        super()._handler(signum, frame)


def _early_handler(signum: int, frame: Any) -> None:
    _SlurmFlag.seen.add(signum)


class RankTask:
    """What submitit runs in every task: torch.distributed's variables from SLURM, then train.

    Pickled into the submitit folder: it holds paths and a few constant settings, never the
    environment (tokens such as WANDB_API_KEY/HF_TOKEN reach the ranks through SLURM's environment
    propagation, not through files)."""

    def __init__(self, run_yaml: str, max_requeues: int, env: dict[str, str] | None = None):
        self.run_yaml, self.max_requeues, self.env = run_yaml, max_requeues, dict(env or {})

    def __call__(self) -> int:
        # submitit's handlers would requeue on USR2 before training even started (and regardless of
        # max_requeues); until job.run installs the training's own, a signal is only recorded.
        for s in PREEMPT_SIGNALS:
            signal.signal(s, _early_handler)
        import submitit
        from . import dist, job
        jenv = submitit.JobEnvironment()
        for k, v in self.env.items():
            os.environ.setdefault(k, v)
        threads = dist.slurm_cpus_per_rank()
        if threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        os.environ["MASTER_ADDR"] = jenv.hostnames[0]
        os.environ["MASTER_PORT"] = str(rendezvous_port(jenv.job_id))
        os.environ["DISTSFT_NUM_NODES"] = str(jenv.num_nodes)
        dist.env.cache_clear()
        e = dist.env()
        dist.export_torch_env(e)
        e = dist.env()
        code = job.run(self.run_yaml, flag=_SlurmFlag())
        if code == EXIT_PREEMPTED:
            self._after_preemption(e, jenv)  # returns only when the job is not requeued
            raise RankFailed(e.rank, code, "preempted; not requeued")
        if code != 0:
            raise RankFailed(e.rank, code)
        return code

    def _after_preemption(self, e: Any, jenv: Any) -> None:
        from . import dist
        out = Path(self._output_dir())
        step = _preempted_step(out)
        decision: tuple[bool, str] = (False, "")
        if e.is_main:
            decision = self._requeue_decision(e, jenv, step)
        requeued, why = dist.broadcast_object(decision)  # rank 0 has already requeued (or not)
        if not requeued:
            if e.is_main:
                print(f"distsft: {why}. Resubmit the same command to resume from "
                      f"checkpoint-{step}" if step else f"distsft: {why}", flush=True)
            return
        # The requeue stops every task of this job (TERM, then KILL); returning first would finish the
        # task and leave a result behind. Die on TERM at once instead of waiting for the KILL.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            time.sleep(5)
        raise RankFailed(e.rank, EXIT_PREEMPTED, "requeued, but SLURM did not stop the job within 600 s")

    def _output_dir(self) -> str:
        from .spec import load_spec as _load
        return _load(self.run_yaml).output_dir

    def _requeue_decision(self, e: Any, jenv: Any, step: str | None) -> tuple[bool, str]:
        seen = {signal.Signals(s).name for s in _SlurmFlag.seen}
        if _SlurmFlag.seen and REQUEUE_SIGNAL not in _SlurmFlag.seen:
            return False, (f"stopped on {'/'.join(sorted(seen))} after a checkpoint; not requeued (only "
                           f"{REQUEUE_SIGNAL.name}, SLURM's time-limit warning, requeues; a cancelled job stays "
                           "cancelled)")
        if e.restart_count >= self.max_requeues:
            return False, (f"preempted, and the job was already requeued {e.restart_count} time(s) "
                           f"(slurm.max_requeues={self.max_requeues}); not requeued")
        try:
            jenv._requeue(self.max_requeues - e.restart_count - 1)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            return False, f"preempted, but `scontrol requeue {jenv.job_id}` failed ({exc}); not requeued"
        print(f"distsft: requeued job {jenv.job_id} after checkpoint-{step} (requeue {e.restart_count + 1} "
              f"of at most {self.max_requeues}); it resumes from that checkpoint", flush=True)
        return True, ""


def _preempted_step(out: Path) -> str | None:
    try:
        return (out / checkpoint.PREEMPTED).read_text().split()[-1]
    except (OSError, IndexError):
        latest = checkpoint.latest_complete(out)
        return latest.name.split("-")[-1] if latest else None


# ------------------------------------------------------------------------------------------ submission

def _cluster_has_gpus(partition: str | None = None) -> bool | None:
    """Whether the (partition's) nodes have GPUs (gres gpu); None when sinfo is not there to ask."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%G", *(["-p", partition] if partition else [])],
                             capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return "gpu" in out


def sbatch_parameters(spec: RunSpec, gpus_on_nodes: bool) -> dict[str, Any]:
    """Parameters of submitit's SlurmExecutor (the names of its sbatch string builder)."""
    s, d = spec.slurm, spec.distributed
    params: dict[str, Any] = {
        "job_name": s.job_name, "nodes": d.nodes, "ntasks_per_node": d.gpus_per_node, "time": s.time_min,
        "signal_delay_s": s.signal_delay_s, "srun_args": list(SRUN_ARGS),
        "additional_parameters": {"requeue": True, **s.additional_parameters},
    }
    if gpus_on_nodes:
        params["gpus_per_node"] = d.gpus_per_node
    for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                       ("constraint", s.constraint), ("cpus_per_task", s.cpus_per_task)):
        if value is not None:
            params[key] = value
    if s.mem_gb is not None:
        params["mem"] = f"{s.mem_gb}GB"
    if s.setup:
        params["setup"] = list(s.setup)
    return params


def rank_env(spec: RunSpec, gpus_on_nodes: bool) -> dict[str, str]:
    """What `distsft run` gives its ranks besides the rank variables (see render.launch_env)."""
    from .render import launch_env
    extra = dict(launch_env(spec, gpus_on_nodes))
    if not gpus_on_nodes:
        extra["DS_ACCELERATOR"] = "cpu"
    return extra


def _check_account(account: str | None) -> None:
    """SLURM refuses an unknown account itself only when it enforces associations; where it does not,
    the job would silently run under the default account. Ask the accounting database (if any)."""
    if not account or shutil.which("sacctmgr") is None:
        return
    user = os.environ.get("USER") or __import__("getpass").getuser()
    try:
        p = subprocess.run(["sacctmgr", "-n", "-P", "show", "assoc", "where", f"user={user}", "format=account"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return
    accounts = sorted({a.strip() for a in p.stdout.split() if a.strip()})
    if p.returncode == 0 and accounts and account not in accounts:
        raise SpecError(f"slurm.account={account}: SLURM's accounting knows no such account for user {user} "
                        f"(sacctmgr lists: {', '.join(accounts)})")


def _sbatch_message(exc: BaseException) -> str:
    """sbatch's own error in one line."""
    text = str(exc).strip()
    errors = [ln.split("error:", 1)[1].strip() for ln in text.splitlines() if "error:" in ln]
    errors = [e for i, e in enumerate(errors) if e and e not in errors[:i]]
    if errors:
        return "; ".join(errors)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def submit(spec_path: str, overrides: list[str], nodes: int | None, gpus: int | None, wait: bool,
           dry_run: bool) -> int:
    from .plan import make_plan
    from .render import write_run_dir
    spec = load_spec(spec_path, overrides, nodes=nodes, gpus=gpus)
    plan = make_plan(spec)  # an indivisible global batch stops here, before anything is queued
    if not dry_run and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise SpecError("no `sbatch` on PATH: this machine is not a SLURM submit host. Train on this machine "
                        "with `distsft run SPEC`, or start a local two-node test cluster with "
                        "`bash slurm/local-cluster.sh start`")
    out = Path(spec.output_dir).resolve()
    spec = spec.model_copy(update={"output_dir": str(out)})
    gpus_found = _cluster_has_gpus(spec.slurm.partition)
    # A dry run on a machine without SLURM shows what a GPU cluster would get.
    gpus_on_nodes = gpus_found if gpus_found is not None else dry_run
    params = sbatch_parameters(spec, gpus_on_nodes)
    run_yaml = out / "run.yaml"
    # A fresh folder per submission: job ids restart at 1 on a new cluster, and requeues keep theirs.
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    folder = out / SUBMITIT_DIR / stamp / "%j"
    task = RankTask(str(run_yaml), spec.slurm.max_requeues, rank_env(spec, gpus_on_nodes))
    if dry_run:
        return _print_dry_run(folder, params, run_yaml, plan, gpus_found)

    _check_account(spec.slurm.account)
    lock = checkpoint.OutputLock(out)
    lock.acquire()  # refuse at once if a job on this machine trains into the same output_dir
    try:
        write_run_dir(spec, out, cuda=gpus_on_nodes, bf16_supported=gpus_on_nodes)
        (out / checkpoint.PREEMPTED).unlink(missing_ok=True)
    finally:
        lock.release()
    import submitit
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=spec.slurm.max_requeues)
    executor.update_parameters(**params)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):  # submitit prints sbatch's stderr itself
            job = executor.submit(task)
    except Exception as exc:  # noqa: BLE001 - sbatch's own message, in one line
        shutil.rmtree(folder.parent, ignore_errors=True)
        raise SpecError(f"sbatch refused the job: {_sbatch_message(exc)}") from None
    log = Path(str(job.paths.stdout).replace("%t", "0"))
    print(f"submitted job {job.job_id}: {plan.nodes} node(s) × {plan.gpus_per_node} = {plan.world_size} ranks, "
          f"global batch {plan.global_batch_size}")
    print(f"run dir  {out}")
    print(f"log      {log}  (rank 0; other ranks: {job.paths.folder}/{job.job_id}_<rank>_log.*)")
    if not wait:
        print(f"follow it with `tail -f {log}`; stop it with `scancel {job.job_id}`")
        return 0
    return follow(job.job_id, Path(job.paths.folder), out, max_requeues=spec.slurm.max_requeues)


def _print_dry_run(folder: Path, params: dict[str, Any], run_yaml: Path, plan: Any,
                   gpus_found: bool | None) -> int:
    from submitit.slurm.slurm import _make_sbatch_string
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    print("# distsft submit --dry-run: nothing was written or queued")
    if gpus_found is None:
        print("# (no sinfo on this machine: shown as for GPU nodes)")
    print(_make_sbatch_string(command=command, folder=folder, **params))
    print(f"# each of the {plan.world_size} srun tasks (one per rank) unpickles distsft.slurm.RankTask, which runs\n"
          f"#   RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS "
          f"MASTER_ADDR=<first host of $SLURM_JOB_NODELIST> MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)) \\\n"
          f"#   {sys.executable} -m distsft.train_entry {run_yaml}\n"
          f"# (in-process: distsft.job.run('{run_yaml}')); after a USR2 checkpoint rank 0 runs "
          f"`scontrol requeue $SLURM_JOB_ID`")
    return 0


# --------------------------------------------------------------------------------------------- waiting

def _run(cmd: list[str]) -> subprocess.CompletedProcess[str] | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None


def job_state(job_id: str) -> dict[str, str]:
    """JobState (and Reason, Restarts, NodeList, ExitCode) from slurmctld while it remembers the job,
    then from accounting. Asked afresh every time (submitit caches finished states per process, and its
    sacct-based state can read UNKNOWN right after a job ends)."""
    p = _run(["scontrol", "show", "job", "-o", str(job_id)])
    if p is not None and p.returncode == 0 and "JobState=" in p.stdout:
        fields = dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv)
        return {k: fields.get(k, "") for k in ("JobState", "Reason", "Restarts", "NodeList", "ExitCode")}
    p = _run(["sacct", "-n", "-X", "-P", "-j", str(job_id), "-o", "State,NodeList,ExitCode"])
    if p is not None and p.returncode == 0 and p.stdout.strip():
        state, nodes, code = (p.stdout.strip().splitlines()[-1].split("|") + ["", "", ""])[:3]
        return {"JobState": state.split()[0] if state else "UNKNOWN", "NodeList": nodes, "ExitCode": code,
                "Reason": "", "Restarts": ""}
    return {"JobState": "UNKNOWN"}


class _Tail:
    def __init__(self, path: Path):
        self.path, self.pos = path, 0

    def read(self) -> str:
        try:
            size = self.path.stat().st_size
        except OSError:
            return ""
        if size < self.pos:
            self.pos = 0  # truncated (a log opened without append mode)
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        # Hold back an unfinished last line until it is complete.
        cut = data.rfind(b"\n") + 1
        self.pos += cut
        return data[:cut].decode(errors="replace")

    def rest(self) -> str:
        with contextlib.suppress(OSError):
            with open(self.path, "rb") as f:
                f.seek(self.pos)
                data = f.read()
            self.pos += len(data)
            return data.decode(errors="replace")
        return ""


def follow(job_id: str, folder: Path, output_dir: Path, poll_s: float = 2.0, max_requeues: int | None = None) -> int:
    """Print rank 0's log as it grows, through requeues, until the job ends; exit with its outcome:
    0 COMPLETED, 2 a rank found bad input, 75 preempted and not requeued, 1 anything else."""
    log = _Tail(folder / f"{job_id}_0_log.out")
    last: tuple[str, str] = ("", "")
    restarts = "0"
    known = time.monotonic()
    try:
        while True:
            chunk = "".join(ln for ln in log.read().splitlines(keepends=True) if not ln.startswith(_QUIET))
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
            info = job_state(job_id)
            state = info["JobState"].rstrip("+")
            if info.get("Restarts") and info["Restarts"] != restarts:
                restarts = info["Restarts"]
                limit = f" of at most {max_requeues}" if max_requeues is not None else ""
                print(f"distsft: job {job_id} was requeued (restart {restarts}{limit}); following it until it "
                      "ends", flush=True)
            if state in FINAL_STATES:
                break
            if state != "UNKNOWN":
                known = time.monotonic()
            elif time.monotonic() - known > 600:
                print(f"distsft: neither slurmctld nor accounting has known job {job_id} for 10 minutes; "
                      f"stopped following (logs: {folder})", file=sys.stderr)
                return 1
            key = (state, info.get("Reason", "") if state == "PENDING" else info.get("NodeList", ""))
            if key != last and state != "UNKNOWN":
                last = key
                detail = f" ({key[1]})" if state == "PENDING" and key[1] not in ("", "None") else (
                    f" on {key[1]}" if state == "RUNNING" and key[1] else "")
                print(f"distsft: job {job_id} {state}{detail}", flush=True)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\ndistsft: stopped following; job {job_id} keeps running (`scancel {job_id}` stops it)",
              file=sys.stderr)
        return 130
    time.sleep(min(poll_s, 1.0))  # lines written just before the job ended
    sys.stdout.write("".join(ln for ln in log.rest().splitlines(keepends=True) if not ln.startswith(_QUIET)))
    sys.stdout.flush()
    if state == "COMPLETED":
        print(f"distsft: job {job_id} completed; outputs in {output_dir}", flush=True)
        return 0
    codes = _rank_codes(folder, job_id)
    preempted = (output_dir / checkpoint.PREEMPTED).exists()
    print(f"distsft: job {job_id} ended {info['JobState']}", file=sys.stderr)
    logs = sorted(folder.glob(f"{job_id}_*_log.err"), key=lambda q: int(q.name.split("_")[1]))
    for p in logs[:4]:
        tail = _error_tail(p.read_text(errors="replace"))
        if tail:
            print(f"--- {p.name} (rank {p.name.split('_')[1]}), last lines:\n" + "\n".join(tail), file=sys.stderr)
    if len(logs) > 4:
        print(f"--- the other ranks' logs: {folder}/{job_id}_<rank>_log.err", file=sys.stderr)
    if 2 in codes.values():
        return 2
    if preempted:  # a complete checkpoint, written when the ranks were asked to stop
        print(f"distsft: the job was preempted and not requeued; its checkpoint is in {output_dir}: resubmit "
              f"the same command to resume (exit code {EXIT_PREEMPTED})", file=sys.stderr)
        return EXIT_PREEMPTED
    return 1


def _rank_codes(folder: Path, job_id: str) -> dict[int, int]:
    """Exit codes of job.run per rank, from submitit's error pickles (RankFailed's message)."""
    codes: dict[int, int] = {}
    for p in folder.glob(f"{job_id}_*_result.pkl"):
        try:
            import pickle
            with open(p, "rb") as f:
                kind, payload = pickle.load(f)
        except Exception:  # noqa: BLE001 - a missing or partial pickle says nothing
            continue
        m = _RANK_FAILED.search(str(payload)) if kind == "error" else None
        if m:
            codes[int(m.group(1))] = int(m.group(2))
    return codes


_TORCH_PREFIX = re.compile(r"^\[rank\d+\]: ")
_PROGRESS = re.compile(r"\d+%\|")  # tqdm bars (loading weights)


def _error_tail(text: str, n: int = 12) -> list[str]:
    """The informative end of a rank's stderr: without submitit's log lines and Python warnings, each
    traceback cut to its exception line (the full log is on disk)."""
    lines = [_TORCH_PREFIX.sub("", ln) for ln in text.splitlines()]
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("submitit ") or not line.strip() or _PROGRESS.search(line) or re.search(r": \w*Warning: ", line):
            i += 2 if re.search(r": \w*Warning: ", line) and i + 1 < len(lines) and lines[i + 1].startswith(" ") else 1
            continue
        if line.startswith("Traceback (most recent call last):"):
            j = i + 1
            while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                j += 1
            if j < len(lines):
                out.append(lines[j])
            i = j + 1
            continue
        out.append(line)
        i += 1
    return out[-n:]
