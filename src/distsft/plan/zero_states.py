"""ZeRO-2/3 model-state bytes per GPU and per node, by DeepSpeed's own accounting, without importing
DeepSpeed: importing it costs `plan` seconds and prints "Setting accelerator to CPU" on machines without
a GPU. The byte counts are those of `estimate_zero2_model_states_mem_needs` (runtime/zero/stage_1_and_2.py)
and `estimate_zero3_model_states_mem_needs` (runtime/zero/stage3.py) in DeepSpeed 0.19; a test holds
these functions equal to DeepSpeed's over a grid of sizes, GPU counts and offload choices.

Per parameter: 16-bit weights 2 bytes; 16-bit gradients 2, fp32 gradients 4, fp32 master weights 4 and
Adam's two moments 8 (together the "18" partitioned over the GPUs). `additional_buffer_factor` (1.5) is
DeepSpeed's headroom on the CPU side.
"""

from __future__ import annotations

BUFFER_FACTOR = 1.5


def zero2(total_params: int, gpus_per_node: int = 1, nodes: int = 1, cpu_offload: bool = True,
          additional_buffer_factor: float = BUFFER_FACTOR) -> tuple[int, int]:
    """(CPU bytes per node, GPU bytes per GPU), as DeepSpeed's estimate_zero2_model_states_mem_needs."""
    gpus = nodes * gpus_per_node
    if cpu_offload:
        gpu = 2 * total_params
        cpu = total_params * max(4 * gpus, 16) * additional_buffer_factor
    else:
        gpu = 2 * total_params + int(18 * total_params / gpus)
        cpu = total_params * 4 * gpus_per_node * additional_buffer_factor
    return int(cpu), int(gpu)


def zero3(total_params: int, largest_layer_params: int, gpus_per_node: int = 1, nodes: int = 1,
          cpu_offload: bool = True, cpu_offload_params: bool = True, zero_init: bool = True,
          additional_buffer_factor: float = BUFFER_FACTOR) -> tuple[int, int, int]:
    """(CPU bytes per node, GPU bytes per GPU, largest layer bytes), as DeepSpeed's
    estimate_zero3_model_states_mem_needs: one gathered layer (fp32-sized) plus the GPU's partition."""
    gpus = nodes * gpus_per_node
    per_node = 1 / nodes
    largest = 4 * largest_layer_params
    if cpu_offload:
        if cpu_offload_params:
            gpu = largest
            factor = 18 * per_node if zero_init else max(4 * gpus_per_node, 18 * per_node)
        else:
            gpu = largest + int(2 * total_params / gpus)
            factor = 16 * per_node if zero_init else max(4 * gpus_per_node, 16 * per_node)
        cpu = total_params * factor * additional_buffer_factor
    else:
        gpu = largest + int(18 * total_params / gpus)
        cpu = (largest_layer_params if zero_init else total_params) * 4 * gpus_per_node * additional_buffer_factor
    return int(cpu), int(gpu), largest
