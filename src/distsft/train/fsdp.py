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
from distsft.errors import SpecError

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
        # Rank 0 alone reads the weights; the other ranks build the model on meta and accelerate
        # broadcasts rank 0's values into their shards (train.rank0_load). Not for QLoRA: accelerate
        # skips this path for bitsandbytes' 4-bit parameters, so every rank loads its 4-bit copy.
        "fsdp_cpu_ram_efficient_loading": spec.peft.method != "qlora",
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


def sync_each_batch(spec: RunSpec, accumulation: int) -> bool:
    """Reduce-scatter every micro-batch's gradients instead of accumulating unsharded ones.

    HF's trainer runs every micro-batch but the last under `accelerator.no_sync`; under FSDP2 that is
    `set_requires_gradient_sync(False)`, which keeps each rank's *unsharded* gradient of the whole model
    until the optimizer step (+2 B/param per GPU in bf16: +16 GB at 8B). accelerate's
    `GradientAccumulationPlugin(sync_each_batch=True)`, which HF's loop reads, skips `no_sync`: each
    micro-batch's gradients are reduce-scattered and accumulated into the fp32 shards (more
    communication, the same memory as no accumulation). On by default under FSDP2 with accumulation;
    `distributed.sync_each_batch: false` trades the memory (plan.memory counts it) for fewer collectives."""
    return (spec.distributed.backend == "fsdp" and accumulation > 1
            and spec.distributed.sync_each_batch is not False)


def accelerator_config(spec: RunSpec, accumulation: int) -> dict[str, Any] | None:
    """TrainingArguments.accelerator_config carrying sync_each_batch, when it applies."""
    if not sync_each_batch(spec, accumulation):
        return None
    return {"gradient_accumulation_kwargs": {"sync_each_batch": True}}


def mixed_precision_policy(precision: str) -> dict[str, Any] | None:
    """FSDP2's MixedPrecisionPolicy with fp32 gradient reduction. accelerate's default for bf16 is
    param/reduce/output all bf16 (`FullyShardedDataParallelPlugin.set_mixed_precision`): gradients are
    reduce-scattered and summed across ranks in bf16. Here the compute stays bf16/fp16 and the
    reduce-scatter runs in fp32 into the fp32 sharded gradients (with sync_each_batch the accumulation
    over micro-batches is fp32 too). None without mixed precision."""
    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return None
    return {"param_dtype": dtype, "reduce_dtype": torch.float32, "output_dtype": dtype}


def wrap_layers_of(args: Any, model: Any, precision: str = "no") -> list[str]:
    """Complete TrainingArguments' FSDP plugin arguments from the loaded model (read when the Trainer
    creates its Accelerator): the classes FSDP2 wraps, and the mixed-precision policy (fp32
    reduction), which TrainingArguments' fsdp_config has no key for. Returns the classes."""
    layers = layer_classes(model)
    if not layers:
        raise SpecError(f"distributed.backend=fsdp: found no decoder layer class in {type(model).__name__} "
                        "(no _no_split_modules and no nn.ModuleList of blocks) to shard")
    args.fsdp_config["transformer_layer_cls_to_wrap"] = layers
    args.fsdp_plugin_args["transformer_cls_names_to_wrap"] = ",".join(layers)
    policy = mixed_precision_policy(precision)
    if policy is not None:
        args.fsdp_plugin_args["mixed_precision_policy"] = policy
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


def save_consolidated(trainer: Any, output_dir: str, precision: str = "no") -> None:
    """The final model as HF safetensors (the adapter for LoRA/QLoRA), gathered in the training dtype
    (train.fsdp_save). Only here; checkpoints stay sharded."""
    from distsft.train.fsdp_save import save_consolidated as save
    save(trainer, output_dir, precision)
