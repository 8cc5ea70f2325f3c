"""FSDP2 (`distributed.backend: fsdp`) through accelerate's FSDP plugin: the wrapped layer class, the
plugin settings (one source for accelerate.yaml and for the ranks' TrainingArguments), the CPU shim,
and the consolidated final save.

Each decoder layer becomes one FSDP unit (`fully_shard`), found from the model: the classes its
`_no_split_modules` names that occur in it (what accelerate and HF's device maps use), else the class
of the blocks in its longest `nn.ModuleList`. Checkpoints are SHARDED_STATE_DICT (torch DCP): every
rank writes its own shards, nothing is gathered, and DCP reshards on load, so a resume on another
process count needs no conversion. Only the final save gathers the full state dict, to write HF
safetensors that `from_pretrained` loads.
"""

from __future__ import annotations

from typing import Any

from distsft.config.spec import RunSpec

STATE_DICT_TYPE = "SHARDED_STATE_DICT"


def layer_classes(model: Any) -> list[str]:
    """Names of the module classes to wrap one FSDP unit each (decoder layers), found in `model`."""
    import torch.nn as nn
    present = {type(m).__name__ for m in model.modules()}
    named = [c for c in (getattr(model, "_no_split_modules", None) or []) if c in present]
    if named:
        return sorted(set(named))
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        return []
    longest = max(lists, key=len)
    return sorted({type(m).__name__ for m in longest})


def layer_classes_for(spec: RunSpec) -> list[str] | None:
    """The layer classes of the spec's model, from its config on the meta device (no weights, no hub
    access); None when the config cannot be read here (the ranks then find them from the loaded model)."""
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(spec.model.name_or_path, trust_remote_code=spec.model.trust_remote_code,
                                            local_files_only=True)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
        return layer_classes(model) or None
    except Exception:  # noqa: BLE001 - a hub id not cached here, an unknown architecture
        return None


def accelerate_fsdp_config(spec: RunSpec, layers: list[str] | None) -> dict[str, Any]:
    """The `fsdp_config` section of accelerate.yaml. Precision is accelerate's top-level
    `mixed_precision` (FSDP2's MixedPrecisionPolicy: bf16/fp16 compute, fp32 sharded masters)."""
    d, t = spec.distributed, spec.train
    cfg: dict[str, Any] = {
        "fsdp_version": 2,
        "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    }
    if layers:
        cfg["fsdp_transformer_layer_cls_to_wrap"] = ",".join(layers)
    cfg.update({
        "fsdp_reshard_after_forward": d.reshard_after_forward,
        "fsdp_offload_params": d.offload_params,
        "fsdp_state_dict_type": STATE_DICT_TYPE,
        # FSDP's own activation checkpointing (per wrapped layer) for full fine-tuning, as HF recommends
        # (transformers#30404). Not with PEFT: its checkpoint wrapper renames every layer's modules
        # (`_checkpoint_wrapped_module.`), and PEFT, which finds the adapter's keys by module name, then
        # saves empty adapters (final and DCP checkpoints alike); there HF's own checkpointing is used
        # (see uses_hf_checkpointing).
        "fsdp_activation_checkpointing": t.gradient_checkpointing and spec.peft.method == "none",
        # Every rank loads the weights itself before sharding (HF's rank-0-only loading needs the model
        # to be created inside the Trainer, which distsft does not do).
        "fsdp_cpu_ram_efficient_loading": False,
    })
    return cfg


def uses_hf_checkpointing(spec: RunSpec) -> bool:
    """Whether train.gradient_checkpointing goes to HF's (non-reentrant) checkpointing: every backend but
    FSDP2 full fine-tuning, which uses FSDP's own (accelerate_fsdp_config)."""
    return spec.train.gradient_checkpointing and not (spec.distributed.backend == "fsdp"
                                                      and spec.peft.method == "none")


def trainer_fsdp_config(spec: RunSpec, layers: list[str]) -> dict[str, Any]:
    """The same settings as TrainingArguments(fsdp=True, fsdp_config=...) takes them, so the ranks run
    FSDP2 however they were started (accelerate launch, torchrun, SLURM tasks)."""
    acc = accelerate_fsdp_config(spec, layers)
    return {"version": 2, "auto_wrap_policy": acc["fsdp_auto_wrap_policy"],
            "transformer_layer_cls_to_wrap": layers, "reshard_after_forward": acc["fsdp_reshard_after_forward"],
            "cpu_offload": acc["fsdp_offload_params"], "state_dict_type": STATE_DICT_TYPE,
            "activation_checkpointing": acc["fsdp_activation_checkpointing"],
            "cpu_ram_efficient_loading": acc["fsdp_cpu_ram_efficient_loading"]}


def wrap_layers_of(args: Any, model: Any) -> list[str]:
    """Set the classes FSDP2 wraps from the loaded model into TrainingArguments' FSDP plugin arguments
    (read when the Trainer creates its Accelerator); returns them."""
    layers = layer_classes(model)
    if not layers:
        from distsft.errors import SpecError
        raise SpecError(f"distributed.backend=fsdp: found no decoder layer class in {type(model).__name__} "
                        "(no _no_split_modules and no nn.ModuleList of blocks) to shard")
    args.fsdp_config["transformer_layer_cls_to_wrap"] = layers
    args.fsdp_plugin_args["transformer_cls_names_to_wrap"] = ",".join(layers)
    return layers


def allow_cpu_fsdp() -> bool:
    """SHIM, only on machines without an accelerator (returns False and patches nothing otherwise).

    accelerate 1.15 turns an FSDP plugin on only for accelerator devices: `AcceleratorState.__init__`
    enters its FSDP branch for MULTI_GPU/NPU/XPU/... but not MULTI_CPU, so CPU ranks would silently
    train unsharded (plain gloo DDP). torch's `fully_shard` and DCP work on CPU with gloo; this makes
    the CPU case take the same branch (distributed type FSDP, the plugin and its mixed precision), so
    tests on CPU run the FSDP2 code path real GPUs run."""
    import torch
    if torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()):
        return False
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType
    original = AcceleratorState.__init__
    if getattr(original, "_distsft_cpu_fsdp", False):
        return True

    def __init__(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    __init__._distsft_cpu_fsdp = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = __init__  # type: ignore[method-assign]
    return True


def save_consolidated(trainer: Any, output_dir: str) -> None:
    """The final model as HF safetensors (the adapter for LoRA/QLoRA): every rank takes part in gathering
    the full state dict (to CPU, rank 0 keeps it), rank 0 writes. Only here; checkpoints stay sharded."""
    plugin = trainer.accelerator.state.fsdp_plugin
    plugin.set_state_dict_type("FULL_STATE_DICT")
    try:
        trainer.save_model(output_dir)
    finally:
        plugin.set_state_dict_type(STATE_DICT_TYPE)
