"""What accelerator this machine has, and the attention backend that follows from it.

Importing torch costs the launcher 1.5–5 s before any rank can start; on a machine with no GPU driver
the answer ("no CUDA") is known from the file system, so torch is imported only where a driver exists.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from functools import lru_cache

# Device nodes a CUDA-capable torch needs: NVIDIA's driver (bare metal and containers), AMD ROCm
# (torch.cuda is HIP there) and WSL2's GPU paravirtualisation.
_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def gpu_driver_present() -> bool:
    return any(os.path.exists(p) for p in _DRIVER_PATHS) or bool(glob.glob("/dev/nvidia[0-9]*"))


@lru_cache(maxsize=1)
def cuda_info() -> tuple[bool, bool, int]:
    """(cuda available, bf16 supported, compute capability major)."""
    if not gpu_driver_present():
        return False, False, 0
    import torch
    if not torch.cuda.is_available():
        return False, False, 0
    major, _ = torch.cuda.get_device_capability()
    return True, torch.cuda.is_bf16_supported(), major


def device_count() -> int:
    if not cuda_info()[0]:
        return 0
    import torch
    return torch.cuda.device_count()


def device_name() -> str:
    """The accelerator the ranks here would run on: CUDA device 0's name, or "cpu"."""
    if not cuda_info()[0]:
        return "cpu"
    import torch
    return torch.cuda.get_device_name(0)


def gpu_memory_gb() -> float | None:
    """GiB of CUDA device 0, or None without CUDA."""
    if not cuda_info()[0]:
        return None
    import torch
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def host_memory_gb() -> float:
    """GiB of this machine's RAM (what CPU ranks share when there is no GPU)."""
    import psutil
    return psutil.virtual_memory().total / 2**30


def choose_attn(requested: str) -> str:
    """auto: flash_attention_2 on CUDA sm80+ when flash-attn is installed, else sdpa."""
    from distsft.errors import SpecError
    cuda, _, major = cuda_info()
    has_fa = importlib.util.find_spec("flash_attn") is not None
    if requested == "flash_attention_2" and not (cuda and has_fa):
        why = "no CUDA device" if not cuda else "the flash-attn package is not installed (pip install 'distsft[gpu]')"
        raise SpecError(f"model.attn_implementation=flash_attention_2 cannot run here: {why}; "
                        "use auto or sdpa")
    if requested != "auto":
        return requested
    return "flash_attention_2" if cuda and major >= 8 and has_fa else "sdpa"


def check_kernels(use_liger_kernel: bool) -> None:
    """`model.use_liger_kernel` needs CUDA (Liger's kernels are Triton) and the liger-kernel package:
    say so before any rank starts instead of failing in every rank's model patching."""
    if not use_liger_kernel:
        return
    from distsft.errors import SpecError
    if not cuda_info()[0]:
        raise SpecError("model.use_liger_kernel: true needs a CUDA GPU (Liger's kernels are Triton GPU "
                        "kernels) and this machine has none; set model.use_liger_kernel: false here")
    if importlib.util.find_spec("liger_kernel") is None:
        raise SpecError("model.use_liger_kernel: true needs the liger-kernel package "
                        "(pip install liger-kernel), which is not installed here")


def kernel_warnings(use_liger_kernel: bool) -> list[str]:
    """For `distsft plan`, which may run on a login node without the job's GPUs: a hint, not an error."""
    if use_liger_kernel and not cuda_info()[0]:
        return ["model.use_liger_kernel needs CUDA, which this machine lacks: `distsft run` here would exit 2 "
                "(a job submitted to GPU nodes is fine)"]
    return []
