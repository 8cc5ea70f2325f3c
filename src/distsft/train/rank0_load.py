"""FSDP2: rank 0 alone reads the weights; every other rank builds the model on the meta device.

Before, every rank ran `from_pretrained` and held the whole model in fp32 in host memory before FSDP2
sharded it: 8 ranks x 4 B/param per node (~256 GB at 8B, ~2.2 TB at 70B). transformers 5.24 does not
skip the read on other ranks by itself (its FSDP hooks in `_move_missing_keys_from_meta_to_device` /
`_initialize_missing_keys` only handle buffers; every rank still reads every tensor, measured), so the
ranks other than 0 never call `from_pretrained`: they build the same architecture from the config under
`init_empty_weights(include_buffers=False)` -- non-persistent buffers such as the rotary `inv_freq` real,
computed from the config -- and give every parameter *uninitialised* CPU storage (`torch.empty`: the
pages are never written, so they cost no resident memory), then go through the same structural steps
as rank 0 (new token rows, PEFT adapters). Not plain meta tensors: accelerate's FSDP2 prepare maps the
optimizer's parameters to the sharded ones by `data_ptr()`, which is 0 for every meta tensor (all
parameters collapse onto one; measured: a KeyError at the first checkpoint, after training the wrong
tensors). accelerate's `cpu_ram_efficient_loading` then moves the model to meta, shards it and
broadcasts rank 0's values into every rank's shards (`fsdp2_load_full_state_dict`), re-registering the
non-persistent buffers it kept.

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
    """The model of `name_or_path` as `from_pretrained` would build it (config, dtype, attention,
    generation config), with uninitialised parameters that take no resident memory and real
    non-persistent buffers."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn,
                                                 trust_remote_code=trust_remote_code)
    _uninitialised_cpu(model)
    model.config.name_or_path = name_or_path
    model.name_or_path = name_or_path
    try:
        model.generation_config = GenerationConfig.from_pretrained(name_or_path)
    except OSError:  # no generation_config.json: from_pretrained keeps the one derived from the config
        pass
    return model


def _uninitialised_cpu(model: Any) -> None:
    """Replace every meta parameter by one with uninitialised CPU storage (tied parameters stay tied)."""
    import torch
    made: dict[int, Any] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):  # noqa: SLF001 - torch's own registry
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in made:
                made[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="cpu"), requires_grad=p.requires_grad)
            module._parameters[name] = made[id(p)]  # noqa: SLF001
