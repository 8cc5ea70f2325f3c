"""Which device this rank trains on, decided in the rank from what the rank itself sees.

Two guesses used to be made elsewhere and both break on real clusters:

* `cuda:LOCAL_RANK`. A SLURM site that binds GPUs to tasks (`--gpu-bind`, `--gpus-per-task`, a
  cli_filter default) shows each task only its own GPU, as `cuda:0`: device LOCAL_RANK does not exist
  on ranks 1-7 ("invalid device ordinal"). accelerate already takes `LOCAL_RANK % device_count()`, but
  DeepSpeed reads LOCAL_RANK itself (`engine._set_distributed_vars`, `zero.Init`'s local device), so
  the rank must agree with it: `device_index` picks the device, and `bind_env` makes LOCAL_RANK say
  that device while the node-local rank distsft needs (who builds a node's data cache) survives as
  NODE_LOCAL_RANK_ENV, which runtime.dist reads first.
* GPU or CPU, guessed on the submit host from `sinfo %G`: GPU nodes without a `gpu` GRES got
  ACCELERATE_USE_CPU / DS_ACCELERATOR=cpu and trained on the CPU, silently. The rank now looks at its
  own devices (`cpu_env`), sets the CPU variables only for itself, and says so when the job asked for
  GPUs it cannot use (`no_gpu_message`).
"""

from __future__ import annotations

import os

from distsft.errors import SpecError
from distsft.runtime.dist import NODE_LOCAL_RANK_ENV


def device_index(local_rank: int, local_world_size: int, visible: int) -> int:
    """The CUDA device index this rank uses among the `visible` devices its process sees.

    * every rank of the node sees all of them (no binding, or torchrun): its local rank;
    * each rank sees exactly one (bound by SLURM): that one, index 0;
    * the ranks of the node share fewer devices evenly (e.g. 2 ranks bound to each of 4 pairs): the
      local rank modulo the visible count, as accelerate does.
    Anything else cannot be mapped without guessing: a clear error instead of "invalid device ordinal"."""
    if visible <= 0:
        raise ValueError("no visible CUDA device")
    if local_rank < visible:
        return local_rank
    if visible == 1:
        return 0
    if local_world_size % visible == 0:
        return local_rank % visible
    raise SpecError(f"this rank (local rank {local_rank} of {local_world_size} on its node) sees {visible} "
                    f"CUDA devices ({visible_devices_text()}): cannot tell which one is its own. Run one rank "
                    "per GPU with every GPU of the node visible to every rank, or bind exactly one GPU per "
                    "rank (srun --gpus-per-task=1)")


def visible_devices_text() -> str:
    return f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}"


def bind_env(local_rank: int, index: int) -> dict[str, str]:
    """The variables that make every library use device `index`: LOCAL_RANK (DeepSpeed, accelerate,
    transformers read it as the device), and the true node-local rank kept for distsft. Empty when
    they already agree."""
    if index == local_rank:
        return {}
    return {"LOCAL_RANK": str(index), NODE_LOCAL_RANK_ENV: str(local_rank)}


def cpu_env(backend: str, cuda: bool) -> dict[str, str]:
    """Variables a rank that sees no usable GPU sets for itself before accelerate/DeepSpeed start:
    DDP needs ACCELERATE_USE_CPU (else accelerate sees no backend and each rank believes it is alone);
    DeepSpeed picks its CPU accelerator itself, DS_ACCELERATOR=cpu only saves its warning on every rank.
    Nothing when the rank has a GPU: these would force the CPU even there."""
    if cuda:
        return {}
    env = {"DS_ACCELERATOR": "cpu"}
    if backend == "ddp":
        env["ACCELERATE_USE_CPU"] = "true"
    return env


def forced_cpu(backend: str, cuda: bool) -> str | None:
    """The notice when ACCELERATE_USE_CPU arrives from the user's shell where distsft would not set it:
    accelerate would obey it silently (a rank with a GPU trains on the CPU; DeepSpeed and FSDP2 become
    plain DDP). The rank decides the device itself (cpu_env), so it is dropped."""
    value = os.environ.get("ACCELERATE_USE_CPU", "")
    if value.lower() not in ("1", "true", "yes") or (not cuda and backend == "ddp"):
        return None
    why = "this rank has a GPU" if cuda else f"it would turn the {backend} backend into plain DDP"
    return f"distsft: ignoring ACCELERATE_USE_CPU={value} from the environment: {why}; distsft chooses the device"


def requested_gpus() -> bool:
    """Whether the scheduler gave this rank GPUs: SLURM's GPU variables, or CUDA_VISIBLE_DEVICES naming
    devices (an empty value or -1 hides them all)."""
    if any(os.environ.get(k) for k in ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS",
                                        "SLURM_GPUS_PER_NODE", "SLURM_GPUS_PER_TASK")):
        return True
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    return bool(cvd) and cvd.strip() not in ("-1", "")


def no_gpu_message(node: str, why: str) -> str:
    """Said (once per node) when the job was given GPUs that this rank cannot use."""
    return (f"distsft: node {node} was allocated GPUs ({visible_devices_text()}) but this rank cannot use "
            f"any ({why}): training on the CPU. Check the node's NVIDIA driver and the torch build "
            "(python -c 'import torch; print(torch.cuda.is_available())' on the node)")


def apply(env: dict[str, str]) -> None:
    """Set the variables for this process (runtime/ is where the environment is written)."""
    os.environ.update(env)


def setup_rank(backend: str) -> bool:
    """First thing in a rank, before torch.distributed, accelerate or DeepSpeed look at the environment:
    decide from this process's own view whether it trains on a GPU, bind LOCAL_RANK to the device it
    will use (or set the CPU variables), and say so when the job was given GPUs this rank cannot use.
    No CUDA context is created here (device_count and is_available do not create one). Returns cuda."""
    from distsft.runtime import dist, hardware
    e = dist.env()
    cuda, why = False, "no NVIDIA/ROCm driver on the node"
    if hardware.gpu_driver_present():
        import torch
        cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
        why = "torch.cuda.is_available() is False"
    stray = forced_cpu(backend, cuda)
    if stray and e.is_local_main:
        dist.warn(stray)
    if stray:
        os.environ.pop("ACCELERATE_USE_CPU", None)
    if cuda:
        import torch
        index = device_index(e.local_rank, e.local_world_size, torch.cuda.device_count())
        apply(bind_env(e.local_rank, index))
    else:
        apply(cpu_env(backend, False))
        if requested_gpus() and e.is_local_main:
            dist.warn(no_gpu_message(e.node_name, why))
    dist.env.cache_clear()
    return cuda
