"""`distsft submit`: one validated, planned job to SLURM through submitit.

Design: one SLURM task per rank (`ntasks_per_node = gpus_per_node`). Every rank is a process that SLURM
started itself (an srun task), so a pre-kill signal (USR2, `slurm.signal_delay_s` before the time limit,
or `scancel --signal=USR2`) reaches every rank directly — there is no launcher in between to lose it.
Each task learns its rank from SLURM (dist.env), the main address is the first host of the job's node
list, and the port is derived from the job id, so it is the same on every node and after a requeue.

srun runs with `--kill-on-bad-exit=1`: when one rank dies (crash, OOM kill, bad data) SLURM ends the
others instead of leaving them blocked in a collective, and the job ends FAILED at once.

Preemption: a rank that gets USR2/TERM/INT/USR1 raises the training's preemption flag; ranks agree on it
at the next step, all save one complete checkpoint and recipe.run_rank returns 75. Then rank 0 decides, for all
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
import shlex
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from distsft.checkpoint import preempt
from distsft.checkpoint.lock import OutputLock
from distsft.checkpoint.preempt import EXIT_PREEMPTED, PREEMPT_SIGNALS
from distsft.config.spec import RunSpec, load_spec
from distsft.errors import SpecError
from distsft import rundir

SUBMITIT_DIR = rundir.SUBMITIT
REQUEUE_SIGNAL = signal.SIGUSR2  # SLURM's --signal=USR2@delay, and submitit's preemption signal
SRUN_ARGS = ["--kill-on-bad-exit=1"]


# ----------------------------------------------------------------------------------------------- ranks

class RankFailed(RuntimeError):
    """A rank's recipe.run_rank ended with a non-zero code; submitit pickles it as the task's error, and the
    waiter reads the code back from there (2: bad spec/data, 75: preempted and not requeued)."""

    def __init__(self, rank: int, code: int, why: str = ""):
        super().__init__(f"rank {rank} exited with code {code}" + (f": {why}" if why else ""))
        self.rank, self.code = rank, code

    def __reduce__(self) -> Any:
        return (RankFailed, (self.rank, self.code))


class _SlurmFlag(preempt.PreemptionFlag):
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
        # max_requeues); until recipe.run_rank installs the training's own, a signal is only recorded.
        for s in PREEMPT_SIGNALS:
            signal.signal(s, _early_handler)
        import submitit
        from distsft.runtime import dist
        from distsft.train import recipe
        jenv = submitit.JobEnvironment()
        for k, v in self.env.items():
            os.environ.setdefault(k, v)
        threads = dist.slurm_cpus_per_rank()
        if threads:
            os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        os.environ["MASTER_ADDR"] = jenv.hostnames[0]
        os.environ["DISTSFT_NUM_NODES"] = str(jenv.num_nodes)
        dist.env.cache_clear()
        e = dist.env()
        os.environ["MASTER_PORT"] = str(self._port(e, jenv))
        dist.env.cache_clear()
        e = dist.env()
        dist.export_torch_env(e)
        e = dist.env()
        code = recipe.run_rank(self.run_yaml, flag=_SlurmFlag())
        if code == EXIT_PREEMPTED:
            self._after_preemption(e, jenv)  # returns only when the job is not requeued
            raise RankFailed(e.rank, code, "preempted; not requeued")
        if code != 0:
            raise RankFailed(e.rank, code)
        return code

    def _port(self, e: Any, jenv: Any) -> int:
        """The job id's port, unless it is already bound on the main host: then rank 0 takes the next free
        one and announces it to every rank through the job's folder (a port in use would otherwise fail
        the rendezvous after a timeout, with a message that names neither the port nor the cause)."""
        from distsft.runtime.ports import agree_port, wanted as wanted_port
        wanted = wanted_port(job_id=jenv.job_id)
        if e.world_size <= 1:
            return wanted
        port, moved = agree_port(jenv.paths.folder, jenv.job_id, e.restart_count, wanted, e.is_main)
        if moved and e.is_main:
            print(f"distsft: port {wanted} (from job id {jenv.job_id}) is in use on {jenv.hostnames[0]}; "
                  f"the ranks rendezvous on port {port}", flush=True)
        return port

    def _after_preemption(self, e: Any, jenv: Any) -> None:
        from distsft.runtime import dist
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
        from distsft.config.spec import load_spec as _load
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
    return preempt.preempted_step(out)


# ------------------------------------------------------------------------------------------ submission

def sbatch_parameters(spec: RunSpec, res: dict[str, Any]) -> dict[str, Any]:
    """Parameters of submitit's SlurmExecutor (the names of its sbatch string builder); `res`: GPUs,
    CPUs per rank and memory from launch.slurm_resources."""
    s, d = spec.slurm, spec.distributed
    params: dict[str, Any] = {
        "job_name": s.job_name, "nodes": d.nodes, "ntasks_per_node": d.gpus_per_node, "time": s.time_min,
        "signal_delay_s": s.signal_delay_s, "srun_args": list(SRUN_ARGS),
        "additional_parameters": {"requeue": True, **s.additional_parameters},
    }
    params.update({k: v for k, v in res.items() if k != "notes"})
    # No --gpu-bind: every task of a node sees all of the node's allocated GPUs (CUDA_VISIBLE_DEVICES)
    # and picks its own; a site default that binds one GPU per task is handled in the rank too
    # (runtime.devices.device_index). (--gpu-bind=none would unset CUDA_VISIBLE_DEVICES, measured.)
    for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                       ("constraint", s.constraint)):
        if value is not None:
            params[key] = value
    if s.setup:
        params["setup"] = list(s.setup)
    return params


def job_resources(spec: RunSpec, mem: dict[str, Any] | None, dry_run: bool) -> dict[str, Any]:
    """GPUs, CPUs and memory for the job, from the partition's nodes (sinfo) and the model's size."""
    from distsft.launch import slurm_resources as sr
    node = sr.query_nodes(spec.slurm.partition)
    need = sr.host_need_gb(mem["num_parameters"] if mem else None, sr.load_bytes(spec), sr.load_copies(spec),
                           spec.distributed.gpus_per_node)
    return sr.resources(spec, node, need, dry_run=dry_run)


def preemption_window(spec: RunSpec, mem: dict[str, Any] | None) -> None:
    """Before anything is queued: a checkpoint that cannot be written within slurm.signal_delay_s is
    exit 2 (plan.preempt_window); one that may not is a warning."""
    from distsft.plan.preempt_window import check
    warning, error = check(spec, (mem or {}).get("checkpoint"))
    if error:
        raise SpecError(error)
    if warning:
        print(f"warning: {warning}", flush=True)


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


def _check_auto_batch(spec: Any) -> None:
    """`per_device_train_batch_size: auto` is resolved here, before the job is queued, and recorded in
    run.yaml: from distributed.gpu_memory_gb or this host's GPU, never from a login node's RAM."""
    from distsft.runtime.hardware import gpu_memory_gb
    if spec.train.per_device_train_batch_size == "auto" and not spec.distributed.gpu_memory_gb and not gpu_memory_gb():
        raise SpecError("train.per_device_train_batch_size: auto: this host has no GPU to measure; set "
                        "distributed.gpu_memory_gb to the memory of the job's GPUs (GB), or a number")


def _time_limit_warning(spec: Any, plan: Any) -> None:
    """The run's estimated time (plan.estimate; measured when a record exists) against slurm.time_min:
    requeued N times, which is fine, or it will not finish."""
    from distsft.plan import estimate
    from distsft.plan.memory import estimate as memory_estimate
    est = estimate.for_plan(spec, plan, memory_estimate(spec, plan), device=None)  # the job's GPUs are not here
    if est is None or est.hours is None:
        return
    warning = estimate.time_limit_warning(est.hours, spec.slurm.time_min, spec.slurm.max_requeues)
    if warning:
        print(f"warning: {warning} ({est.source} estimate: {est.basis})", flush=True)


def submit(spec_path: str, overrides: list[str], nodes: int | None, gpus: int | None, wait: bool,
           dry_run: bool, prepare: bool = True) -> int:
    from distsft.plan.report import make_plan
    from distsft.launch.run_files import write_run_dir
    spec = load_spec(spec_path, overrides, nodes=nodes, gpus=gpus)
    _check_auto_batch(spec)
    plan = make_plan(spec)  # an indivisible global batch stops here, before anything is queued
    if not dry_run and (shutil.which("sbatch") is None or shutil.which("srun") is None):
        raise SpecError("no `sbatch` on PATH: this machine is not a SLURM submit host. Train on this machine "
                        "with `distsft run SPEC`, or start a local two-node test cluster with "
                        "`bash slurm/local-cluster.sh start`")
    out = Path(spec.output_dir).resolve()
    spec = spec.model_copy(update={"output_dir": str(out)})
    from distsft.plan.memory import estimate
    mem = estimate(spec, plan)  # the model's size (None when its config is not readable here)
    preemption_window(spec, mem)
    res = job_resources(spec, mem, dry_run)
    params = sbatch_parameters(spec, res)
    run_yaml = out / rundir.RUN_YAML
    # A fresh folder per submission: job ids restart at 1 on a new cluster, and requeues keep theirs.
    stamp = time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]
    folder = out / SUBMITIT_DIR / stamp / "%j"
    # No CPU/GPU variables from here: each rank decides from what it sees (runtime.devices).
    task = RankTask(str(run_yaml), spec.slurm.max_requeues)
    if dry_run:
        return _print_dry_run(folder, params, run_yaml, plan, res["notes"])

    _check_account(spec.slurm.account)
    from distsft.launch.after import check_tasks, submit_eval_job
    check_tasks(spec, out)  # eval.after_training: an unknown task is exit 2 before anything is queued
    if prepare:
        # On this host, before anything is queued: bad data is exit 2 here, not a failed job holding GPUs,
        # and the ranks find the caches built (job.prepare_split builds only what is missing).
        from distsft.launch.prepare import build_caches, describe
        stats = build_caches(spec)
        plan = make_plan(spec, stats["train"])
        print("\n".join(describe(stats)), flush=True)
        _time_limit_warning(spec, plan)
    lock = OutputLock(out)
    lock.acquire()  # refuse at once if a job on this machine trains into the same output_dir
    try:
        gpus = "gpus_per_node" in params  # the run files describe what was asked for; ranks decide
        write_run_dir(spec, out, cuda=gpus, bf16_supported=gpus)
        preempt.clear_preempted(out)
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
    if spec.eval.after_training:  # a separate one-node job after this one (launch/after.py says why)
        submit_eval_job(spec, out, folder.parent / "eval-%j", gpus, job.job_id)
    log = Path(str(job.paths.stdout).replace("%t", "0"))
    print(f"submitted job {job.job_id}: {plan.nodes} node(s) × {plan.gpus_per_node} = {plan.world_size} ranks, "
          f"global batch {plan.global_batch_size}")
    print(f"run dir  {out}")
    print(f"log      {log}  (rank 0; other ranks: {job.paths.folder}/{job.job_id}_<rank>_log.*)")
    if not wait:
        print(f"follow it with `tail -f {log}`; stop it with `scancel {job.job_id}`")
        return 0
    from distsft.launch.follow import follow
    return follow(job.job_id, Path(job.paths.folder), out, max_requeues=spec.slurm.max_requeues)


def _print_dry_run(folder: Path, params: dict[str, Any], run_yaml: Path, plan: Any, notes: list[str]) -> int:
    from submitit.slurm.slurm import _make_sbatch_string
    command = " ".join([shlex.quote(sys.executable), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    print("# distsft submit --dry-run: nothing was written or queued")
    for note in notes:
        print(f"# {note}")
    print(_make_sbatch_string(command=command, folder=folder, **params))
    print(f"# each of the {plan.world_size} srun tasks (one per rank) unpickles distsft.slurm.RankTask, which runs\n"
          f"#   RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS "
          f"MASTER_ADDR=<first host of $SLURM_JOB_NODELIST> MASTER_PORT=$((20000 + SLURM_JOB_ID % 12000)) (the next free one if bound) \\\n"
          f"#   {sys.executable} -m distsft.train {run_yaml}\n"
          f"# (in-process: distsft.train.recipe.run_rank('{run_yaml}')); after a USR2 checkpoint rank 0 runs "
          f"`scontrol requeue $SLURM_JOB_ID`")
    return 0
