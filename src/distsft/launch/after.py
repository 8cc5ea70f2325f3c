"""`eval.after_training: true`: lm-eval on the final model once training has succeeded.

Where it runs, and why:
* `distsft run` (one machine): right after the ranks exit 0, on the same GPUs. With several CUDA
  devices it is `accelerate launch --num_processes G -m distsft.posttrain.eval`, lm-eval's own
  data-parallel mode (each process scores a slice of the requests; rank 0 writes); otherwise one process.
* `distsft submit` (SLURM): a SEPARATE one-node job that depends on the training job (`afterok`).
  Evaluating inside the training job would keep every node of the allocation (N x G GPUs) waiting
  while one node loads the consolidated model and lm-eval scores it -- lm-eval's data parallelism does
  not span nodes, and a ZeRO-3 / FSDP2 model must first be gathered into safetensors. The dependent
  job asks for one node, holds nothing while training runs, starts only when training finished
  successfully (a preempted and requeued training job keeps its id, so `afterok` waits through
  requeues), and an eval failure (a task's data, a typo) leaves the training job's state alone and can
  be rerun by itself with `distsft eval RUN_DIR`.

Task names are checked before training starts: a typo is exit 2 now, not after the run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from distsft import rundir

EVAL_MODULE = "distsft.posttrain.eval"


def check_tasks(spec: Any, out: Path) -> None:
    """Exit 2 (SpecError) before training for a task lm-eval does not know."""
    if not spec.eval.after_training:
        return
    from distsft.posttrain.eval import task_list, task_manager
    task_manager(spec, out, task_list(None, spec))


def local_command(out: Path, gpus: int, cuda: bool) -> list[str]:
    entry = ["-m", EVAL_MODULE, str(out), "final"]
    if cuda and gpus > 1:
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(gpus), *entry]
    return [sys.executable, *entry]


def eval_locally(spec: Any, out: Path, cuda: bool) -> int:
    """Run the eval after a successful local training; its exit code (the model is saved either way)."""
    cmd = local_command(out, spec.distributed.gpus_per_node, cuda)
    print(f"distsft: eval.after_training: {' '.join(cmd[1:])}", flush=True)
    rc = subprocess.run(cmd, env=dict(os.environ, PYTHONUNBUFFERED="1")).returncode
    if rc != 0:
        print(f"distsft: the model is saved in {out}; the eval failed (exit {rc}): rerun it with "
              f"`distsft eval {out}`", file=sys.stderr)
    return rc


def eval_job_parameters(spec: Any, gpus_on_nodes: bool, train_job_id: str) -> dict[str, Any]:
    """submitit SlurmExecutor parameters of the eval job: one node, one task, the node's GPUs for lm-eval,
    started only after the training job succeeded."""
    s = spec.slurm
    params: dict[str, Any] = {
        "job_name": f"{s.job_name}-eval", "nodes": 1, "ntasks_per_node": 1, "time": s.time_min,
        "additional_parameters": {**s.additional_parameters, "dependency": f"afterok:{train_job_id}",
                                  "kill-on-invalid-dep": "yes"},
    }
    if gpus_on_nodes:
        params["gpus_per_node"] = 1  # one process: lm-eval's HF model on one GPU
    for key, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos),
                       ("constraint", s.constraint), ("cpus_per_task", s.cpus_per_task)):
        if value is not None:
            params[key] = value
    if s.mem_gb is not None:
        params["mem"] = f"{s.mem_gb}GB"
    if s.setup:
        params["setup"] = list(s.setup)
    return params


def submit_eval_job(spec: Any, out: Path, folder: Path, gpus_on_nodes: bool, train_job_id: str) -> Any:
    import submitit
    from distsft.posttrain.eval import main
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=0)
    executor.update_parameters(**eval_job_parameters(spec, gpus_on_nodes, train_job_id))
    job = executor.submit(main, [str(out), "final"])
    print(f"eval job {job.job_id}: lm-eval on the final model after job {train_job_id} succeeds (afterok); "
          f"results in {rundir.eval_results(out, 'final')}")
    return job
