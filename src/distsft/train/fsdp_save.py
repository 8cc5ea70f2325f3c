"""The final FSDP2 model as HF safetensors, gathered in the dtype it trained in.

accelerate's FULL_STATE_DICT path (`get_model_state_dict(full_state_dict=True, cpu_offload=True)`)
gathers every parameter as the fp32 master to rank 0's host memory and HF writes that: twice the size
of the bf16 model DeepSpeed writes, in RAM and on disk (8B: 32 GB instead of 16), and for LoRA the
whole base model is gathered to save an adapter of a few MB.

Here every rank walks the sharded state dict in the same order; each parameter is cast to the save
dtype on its shard (half the all-gather traffic), gathered, and kept on rank 0's CPU only. For a PEFT
model only the entries PEFT writes (`get_peft_model_state_dict` of the sharded dict, which picks
entries without touching them) are gathered. Then HF's own `save_model` writes them (rank 0).
"""

from __future__ import annotations

from typing import Any

from distsft.runtime import dist


def save_dtype(precision: str) -> Any:
    """bf16/fp16 under mixed precision (the weights the forward pass used), fp32 otherwise."""
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)


def keys_to_save(model: Any, sharded: dict[str, Any]) -> list[str]:
    """The state-dict keys the final save writes: all of them, or for a PEFT model the ones PEFT
    selects (identified by identity: PEFT renames keys but passes the tensors through)."""
    try:
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
    except ImportError:
        return list(sharded)
    if not isinstance(model, PeftModel):
        return list(sharded)
    picked = get_peft_model_state_dict(model, state_dict=sharded)
    ids = {id(v) for v in picked.values()}
    keys = [k for k, v in sharded.items() if id(v) in ids]
    # A tensor PEFT transformed (not passed through) cannot be traced back: gather everything.
    return keys if len(keys) >= len(picked) else list(sharded)


def gather_full(model: Any, dtype: Any, keys: list[str] | None = None) -> dict[str, Any]:
    """{key: full tensor on CPU} on rank 0 ({} elsewhere), floating tensors in `dtype`. A collective:
    every rank calls it, and walks the keys in the same (state-dict) order."""
    from torch.distributed.tensor import DTensor
    sharded = model.state_dict()
    wanted = set(sharded if keys is None else keys)
    is_main = dist.env().is_main
    out: dict[str, Any] = {}
    for key, value in sharded.items():
        if key not in wanted:
            continue
        t = value
        if t.is_floating_point() and t.dtype != dtype:
            t = t.to(dtype)
        if isinstance(t, DTensor):
            mesh_device = t.device_mesh.device_type
            if t.device.type != mesh_device:  # CPU-offloaded shards: gather on the mesh's device
                t = t.to(mesh_device)
            t = t.full_tensor()
        if is_main:
            out[key] = t.detach().to("cpu", copy=True).contiguous()
        del t
    return out


def save_consolidated(trainer: Any, output_dir: str, precision: str) -> None:
    """The final model (the adapter for LoRA/QLoRA) in `output_dir`: gathered here in the training
    dtype, written by HF's `_save` on rank 0 (config, tokenizer and training args with it)."""
    model = trainer.accelerator.unwrap_model(trainer.model, keep_torch_compile=False)
    dtype = save_dtype(precision)
    sharded = model.state_dict()
    state = gather_full(model, dtype, keys_to_save(model, sharded))
    del sharded
    if trainer.args.should_save:
        trainer._save(output_dir, state_dict=state)  # noqa: SLF001 - HF's own writer (rank 0)
        _record_dtype(output_dir, dtype)


def _record_dtype(output_dir: str, dtype: Any) -> None:
    """save_pretrained writes the model's parameter dtype (the fp32 masters) into config.json; say what
    the safetensors hold, so from_pretrained(dtype="auto") loads them as they are."""
    import json
    from pathlib import Path
    path = Path(output_dir) / "config.json"
    if not path.exists():  # an adapter: adapter_config.json carries no dtype
        return
    cfg = json.loads(path.read_text())
    cfg["dtype"] = str(dtype).split(".")[-1]
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
