"""FSDP2: rank 0 alone reads the weights; every other rank builds the model on the meta device.

Before, every rank ran `from_pretrained` and held the whole model in fp32 in host memory before FSDP2
sharded it: 8 ranks x 4 B/param per node (~256 GB at 8B, ~2.2 TB at 70B). transformers 5.24 does not
skip the read on other ranks by itself (its FSDP hooks in `_move_missing_keys_from_meta_to_device` /
`_initialize_missing_keys` only handle buffers; every rank still reads every tensor, measured), so the
ranks other than 0 never call `from_pretrained`: they build the same architecture from the config under
`init_empty_weights(include_buffers=False)` -- parameters on meta, non-persistent buffers such as the
rotary `inv_freq` real, computed from the config -- and go through the same structural steps as rank 0
(new token rows, PEFT adapters) on meta tensors. accelerate's `cpu_ram_efficient_loading` then shards
the meta model and broadcasts rank 0's values into every rank's shards (`fsdp2_load_full_state_dict`),
re-registering the non-persistent buffers it kept.

Not for QLoRA: accelerate skips this path for bitsandbytes' Params4bit (they cannot move to meta), so
every rank loads its (4-bit) copy as before.
"""

from __future__ import annotations

from typing import Any


def applies(backend: str, peft_method: str, world_size: int) -> bool:
    """Rank-0 loading under FSDP2 with more than one rank, except QLoRA (see the module docstring)."""
    return backend == "fsdp" and world_size > 1 and peft_method != "qlora"


def loads_weights(backend: str, peft_method: str, world_size: int, rank: int) -> bool:
    """Whether this rank reads the checkpoint: rank 0 always, the others only when `applies` is false."""
    return rank == 0 or not applies(backend, peft_method, world_size)


def empty_model(name_or_path: str, dtype: Any, attn: str, trust_remote_code: bool) -> Any:
    """The model of `name_or_path` with parameters on the meta device and real non-persistent buffers,
    as `from_pretrained` would build it (config, dtype, attention, generation config)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=trust_remote_code)
    model.config.name_or_path = name_or_path
    model.name_or_path = name_or_path
    try:
        model.generation_config = GenerationConfig.from_pretrained(name_or_path)
    except OSError:  # no generation_config.json: from_pretrained keeps the one derived from the config
        pass
    return model


def check_meta_consistent(model: Any, is_loader: bool) -> None:
    """On a rank that did not load: every parameter must be on meta (values come from rank 0); on the
    loading rank none may be. A model built otherwise would be silently overwritten or left empty."""
    devices = {p.device.type for p in model.parameters()}
    if not is_loader and devices != {"meta"}:
        raise RuntimeError(f"rank-0 loading: a non-loading rank holds real parameters ({devices})")
    if is_loader and "meta" in devices:
        raise RuntimeError("rank-0 loading: the loading rank has parameters left on the meta device")
