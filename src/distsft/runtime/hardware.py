"""What accelerator this machine has, and the attention backend that follows from it.

Importing torch costs the launcher 1.5–5 s before any rank can start; on a machine with no GPU driver
the answer ("no CUDA") is known from the file system, so torch is imported only where a driver exists.
"""

from __future__ import annotations

import glob
import importlib.util
import os
from functools import lru_cache
from typing import Callable

# Device nodes a CUDA-capable torch needs: NVIDIA's driver (bare metal and containers), AMD ROCm
# (torch.cuda is HIP there) and WSL2's GPU paravirtualisation.
_DRIVER_PATHS = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def gpu_driver_present() -> bool:
    return any(os.path.exists(p) for p in _DRIVER_PATHS) or bool(glob.glob("/dev/nvidia[0-9]*"))


@lru_cache(maxsize=1)
def cuda_info() -> tuple[bool, bool, int]:
    """(cuda available, native bf16, compute capability major). Native bf16 is read from the capability
    (sm80+; ROCm: always), not from `torch.cuda.is_bf16_supported()`: that also counts bf16 *emulated* on
    V100/T4 (slow), and decides it by allocating a tensor on the current device, which before
    `set_device` is GPU 0 -- a CUDA context there from every rank of the node."""
    if not gpu_driver_present():
        return False, False, 0
    import torch
    if not torch.cuda.is_available():
        return False, False, 0
    major, _ = torch.cuda.get_device_capability(0)  # a properties query: no context, no allocation
    return True, native_bf16(major, bool(torch.version.hip)), major


def native_bf16(major: int, rocm: bool = False) -> bool:
    return rocm or major >= 8


def tf32_arg(cuda: bool, major: int) -> bool | None:
    """HF's `tf32`: on for fp32 matmuls on Ampere or newer (fp32 master weights of full fine-tuning
    outside autocast, the fp32 LM-head paths); None elsewhere (HF raises on True without it)."""
    return True if cuda and major >= 8 else None


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


FLASH = "flash_attention_2"


def flash_attn_problem() -> str | None:
    """None when flash-attn imports and transformers can use it here, else why not. A real import:
    `find_spec` also finds a wheel built for another torch/CUDA, whose import fails (an undefined symbol
    in flash_attn_2_cuda) -- and then every rank failed later as "cannot load model.name_or_path"."""
    if importlib.util.find_spec("flash_attn") is None:
        return "the flash-attn package is not installed (pip install 'distsft[gpu]')"
    try:
        import flash_attn  # noqa: F401
        from flash_attn import flash_attn_varlen_func  # noqa: F401 - what transformers calls for packed rows
    except Exception as exc:  # noqa: BLE001 - ImportError, OSError (a .so), RuntimeError: all mean the same
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return (f"the flash-attn package does not import ({type(exc).__name__}: {first}); it was probably "
                "built for another torch or CUDA: reinstall it for this torch (pip install flash-attn "
                "--no-build-isolation)")
    from transformers.utils import is_flash_attn_2_available
    if not is_flash_attn_2_available():
        return "transformers cannot use flash-attn here (it needs a CUDA device and flash-attn >= 2.3.3)"
    return None


def choose_attn(requested: str, half: bool = True, warn: Callable[[str], None] | None = None,
                cuda_major: int | None = None) -> str:
    """The attention implementation to ask transformers for. `half`: the attention runs in bf16/fp16
    (mixed precision or half weights); flash-attn takes nothing else, so fp32 compute never gets it.
    `auto` is flash_attention_2 on an sm80+ GPU when flash-attn imports, else sdpa (with a warning when
    flash-attn is installed but broken). `cuda_major`: the compute capability major (0: no CUDA);
    read from this machine when None."""
    from distsft.errors import SpecError
    major = cuda_info()[2] if cuda_major is None else cuda_major
    if requested == FLASH:
        if not half:
            raise SpecError("model.attn_implementation=flash_attention_2 needs bf16 or fp16 compute (flash-attn "
                            "takes nothing else) and this run computes in fp32 (train.bf16: false); set "
                            "train.bf16: true, or use sdpa")
        why = flash_attn_problem()
        if why and major == 0:  # say both: installing flash-attn alone would not make it run here
            why = f"no CUDA device, and {why}"
        if why is None and 0 < major < 8:
            why = f"flash-attn needs an Ampere or newer GPU (compute capability 8.0+); this one is {major}.x"
        if why:
            raise SpecError(f"model.attn_implementation=flash_attention_2 cannot run here: {why}; use auto or sdpa")
        return requested
    if requested != "auto":
        return requested
    if major < 8 or not half or importlib.util.find_spec("flash_attn") is None:
        return "sdpa"
    why = flash_attn_problem()
    if why:
        if warn:
            warn(f"warning: model.attn_implementation=auto uses sdpa, not flash_attention_2: {why}")
        return "sdpa"
    return FLASH


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
