"""The checks that need neither data nor a process group, one list for both sides: `distsft run` calls
it before any rank starts (bad input is exit 2 there, once), and every rank calls it again, since ranks
can be started by hand (`accelerate launch`, torchrun, SLURM) on a machine the launcher never saw."""

from __future__ import annotations

from typing import Any

from distsft.config.optim import check_available
from distsft.runtime import dist
from distsft.runtime.hardware import check_kernels, choose_attn, cuda_info


def half_compute(spec: Any, precision: str) -> bool:
    """Does attention run in bf16/fp16? Under mixed precision, with half weights, and under QLoRA
    (transformers casts q/k/v to the quantized model's compute dtype)."""
    return (precision in ("bf16", "fp16") or spec.model.torch_dtype in ("bfloat16", "float16")
            or spec.peft.method == "qlora")


def check(spec: Any) -> str:
    """Raise SpecError for an option this machine cannot run; return the attention implementation."""
    from distsft.train.backend import resolve_precision
    cuda, bf16_ok, _ = cuda_info()
    attn = choose_attn(spec.model.attn_implementation, half=half_compute(spec, resolve_precision(spec, cuda, bf16_ok)),
                       warn=dist.print0)
    check_kernels(spec.model.use_liger_kernel)  # Liger without CUDA
    check_available(spec.train.optim)  # an optimizer whose package is missing
    from distsft.config.seqpar import machine_errors
    from distsft.errors import SpecError
    for error in machine_errors(spec, cuda):  # ring attention / activation offloading on CPU
        raise SpecError(error)
    if spec.train.router_aux_loss_coef is not None or (spec.peft.method != "none" and spec.peft.target_parameters):
        from distsft.train.moe import preflight as moe_options  # imports torch: only for these options
        moe_options(spec)  # an MoE option on a dense model, target_parameters that match nothing
    return attn
