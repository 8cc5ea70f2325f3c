"""`distsft submit`: one validated, planned job to SLURM through submitit.

Design: one SLURM task per rank (`tasks_per_node = gpus_per_node`). Every rank is a process that SLURM
started itself, so a pre-kill signal (USR2, `slurm.signal_delay_s` before the limit, or a preempting
scheduler's) reaches every rank directly — there is no launcher in between to lose it. Each task learns
its rank from SLURM (dist.env), the main address is the first host of the job's node list, and the port
is derived from the job id, so it is the same on every node and after a requeue. After a preemption
checkpoint, rank 0 requeues the job with submitit's own requeue call (at most `slurm.max_requeues`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .checkpoint import EXIT_PREEMPTED
from .spec import RunSpec, SpecError, load_spec

SUBMITIT_DIR = "submitit"


def rendezvous_port(job_id: str) -> int:
    """Same on every node and across requeues (the job id survives a requeue)."""
    digits = "".join(c for c in str(job_id).split("_")[0] if c.isdigit()) or "0"
    return 20000 + int(digits) % 20000


class RankTask:
    """What submitit runs in every task: set up torch.distributed's variables from SLURM, train."""

    def __init__(self, run_yaml: str, max_requeues: int):
        self.run_yaml, self.max_requeues = run_yaml, max_requeues

    def __call__(self) -> int:
        import submitit
        from . import dist, job
        jenv = submitit.JobEnvironment()
        os.environ["MASTER_ADDR"] = jenv.hostnames[0]
        os.environ["MASTER_PORT"] = str(rendezvous_port(jenv.job_id))
        os.environ["DISTSFT_NUM_NODES"] = str(jenv.num_nodes)
        dist.env.cache_clear()
        e = dist.env()
        dist.export_torch_env(e)
        code = job.run(self.run_yaml)  # installs its own signal handlers in place of submitit's
        if code == EXIT_PREEMPTED:
            if e.restart_count >= self.max_requeues:
                raise RuntimeError(f"preempted, and the job was already requeued {e.restart_count} times "
                                   f"(slurm.max_requeues={self.max_requeues}); resubmit to resume")
            if e.is_main:
                jenv._requeue(self.max_requeues - e.restart_count)
                print(f"distsft: requeued job {jenv.job_id} "
                      f"({e.restart_count + 1}/{self.max_requeues}); it resumes from the checkpoint", flush=True)
            time.sleep(600)  # the requeue stops this job; returning would mark it finished first
        if code != 0:
            raise RuntimeError(f"rank {e.rank} exited with code {code}")
        return code


def _cluster_has_gpus() -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%G"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "gpu" in out


def executor_parameters(spec: RunSpec, gpus_on_nodes: bool) -> dict[str, Any]:
    s, d = spec.slurm, spec.distributed
    params: dict[str, Any] = {
        "nodes": d.nodes, "tasks_per_node": d.gpus_per_node, "timeout_min": s.time_min,
        "name": s.job_name, "slurm_signal_delay_s": s.signal_delay_s, "slurm_max_num_timeout": s.max_requeues,
        "slurm_additional_parameters": {"requeue": True, **s.additional_parameters},
    }
    if gpus_on_nodes:
        params["gpus_per_node"] = d.gpus_per_node
    for key, value in (("slurm_partition", s.partition), ("slurm_account", s.account), ("slurm_qos", s.qos),
                       ("slurm_constraint", s.constraint), ("cpus_per_task", s.cpus_per_task),
                       ("mem_gb", s.mem_gb)):
        if value is not None:
            params[key] = value
    if s.setup:
        params["slurm_setup"] = list(s.setup)
    return params


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    lines = [ln for ln in text.splitlines() if "error" in ln.lower()] or text.splitlines() or [type(exc).__name__]
    return lines[-1].strip()


def submit(spec_path: str, overrides: list[str], nodes: int | None, gpus: int | None, wait: bool,
           dry_run: bool) -> int:
    import submitit
    from .model import cuda_info
    from .plan import make_plan
    from .render import write_run_dir
    spec = load_spec(spec_path, overrides, nodes=nodes, gpus=gpus)
    plan = make_plan(spec)  # an indivisible global batch stops here, before anything is queued
    if not dry_run and shutil.which("sbatch") is None:
        raise SpecError("no `sbatch` on PATH: this machine is not a SLURM submit host. Train here with "
                        "`distsft run SPEC`, or start a local test cluster with `bash slurm/local-cluster.sh start`")
    out = Path(spec.output_dir).resolve()
    spec = spec.model_copy(update={"output_dir": str(out)})
    gpus_on_nodes = _cluster_has_gpus() if not dry_run else cuda_info()[0]
    paths = write_run_dir(spec, out, cuda=gpus_on_nodes, bf16_supported=gpus_on_nodes)
    folder = out / SUBMITIT_DIR / "%j"
    params = executor_parameters(spec, gpus_on_nodes)
    task = RankTask(str(paths["run"]), spec.slurm.max_requeues)
    if dry_run:
        return _print_dry_run(folder, params, paths["run"], plan)
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**params)
    try:
        job = executor.submit(task)
    except Exception as exc:  # noqa: BLE001 - sbatch's own message, in one line
        raise SpecError(f"sbatch refused the job: {_one_line(exc)}") from None
    log = Path(str(job.paths.stdout).replace("%t", "0"))
    print(f"submitted job {job.job_id}: {plan.nodes} node(s) × {plan.gpus_per_node} = {plan.world_size} ranks, "
          f"global batch {plan.global_batch_size}")
    print(f"run dir  {out}")
    print(f"log      {log}  (rank 0)")
    if not wait:
        return 0
    return follow(job, log)


def _print_dry_run(folder: Path, params: dict[str, Any], run_yaml: Path, plan: Any) -> int:
    from submitit.slurm.slurm import _make_sbatch_string
    p = dict(params)
    sb = {"nodes": p.pop("nodes"), "ntasks_per_node": p.pop("tasks_per_node"), "time": p.pop("timeout_min"),
          "job_name": p.pop("name"), "signal_delay_s": p.pop("slurm_signal_delay_s"),
          "additional_parameters": p.pop("slurm_additional_parameters")}
    p.pop("slurm_max_num_timeout")
    rename = {"slurm_partition": "partition", "slurm_account": "account", "slurm_qos": "qos",
              "slurm_constraint": "constraint", "slurm_setup": "setup", "gpus_per_node": "gpus_per_node",
              "cpus_per_task": "cpus_per_task"}
    for k, v in p.items():
        if k == "mem_gb":
            sb["mem"] = f"{v}GB"
        else:
            sb[rename[k]] = v
    command = shlex.join([sys.executable, "-u", "-m", "submitit.core._submit", str(folder)])
    print(_make_sbatch_string(command=command, folder=folder, **sb))
    print(f"# each of the {plan.world_size} tasks (one per rank) runs distsft.slurm.RankTask, i.e.\n"
          f"#   RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS "
          f"MASTER_ADDR=<first host of $SLURM_JOB_NODELIST> MASTER_PORT=20000+$SLURM_JOB_ID%20000 \\\n"
          f"#   {sys.executable} -m distsft.train_entry {run_yaml}")
    return 0


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE"}


def follow(job: Any, log: Path, poll_s: float = 2.0) -> int:
    """Print rank 0's log as it grows until the job ends; exit with the job's outcome."""
    pos = 0
    state = "UNKNOWN"
    while True:
        if log.exists():
            with open(log, errors="replace") as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                sys.stdout.write(chunk)
                sys.stdout.flush()
        state = job.state.split()[0] if job.state else "UNKNOWN"
        if state.rstrip("+") in FINAL_STATES:
            break
        time.sleep(poll_s)
    time.sleep(poll_s)  # last lines flushed after the state changed
    if log.exists():
        with open(log, errors="replace") as f:
            f.seek(pos)
            sys.stdout.write(f.read())
    if state == "COMPLETED":
        print(f"distsft: job {job.job_id} completed")
        return 0
    print(f"distsft: job {job.job_id} ended {state}", file=sys.stderr)
    for p in sorted(Path(job.paths.folder).glob(f"{job.job_id}_*_log.err")):
        tail = p.read_text(errors="replace").splitlines()[-15:]
        if tail:
            print(f"--- tail of {p.name}:\n" + "\n".join(tail), file=sys.stderr)
    return 1
