"""TRL's SFTConfig for one rank, built complete from the spec, the machine, the batch and the data's step
count: every value distsft plans is passed under TRL/HF's own name, and nothing is patched afterwards."""

from __future__ import annotations

from typing import Any

from distsft import rundir
from distsft.config.schedules import scheduler_kwargs
from distsft.plan.batch import warmup_steps
from distsft.runtime import dist


def sft_config(r: Any) -> Any:
    """`r` is the rank's train.recipe.Rank after load_data."""
    from trl import SFTConfig
    from distsft.train.backend import process_group_timeout_s, render_deepspeed
    from distsft.runtime.hardware import cuda_info, tf32_arg
    from distsft.train.fsdp import uses_hf_checkpointing
    spec, t, batch, e = r.spec, r.spec.train, r.batch, dist.env()
    cuda, _, major = cuda_info()
    ds_config = render_deepspeed(spec, batch, r.precision) if spec.distributed.backend == "deepspeed" else None
    if r.load_universal:
        from distsft.checkpoint.universal import with_load_universal
        ds_config = with_load_universal(ds_config)
    total = r.total_steps
    return SFTConfig(
        output_dir=str(r.out), per_device_train_batch_size=batch.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size or batch.per_device_train_batch_size,
        parallelism_config=_parallelism(r), activation_offloading=t.activation_offloading,
        gradient_accumulation_steps=batch.gradient_accumulation_steps, learning_rate=float(t.learning_rate),
        lr_scheduler_type=t.lr_scheduler_type, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        max_steps=total, warmup_steps=warmup_steps(total, t.warmup_ratio),
        lr_scheduler_kwargs=scheduler_kwargs(t, total) or {},  # min-LR cosine / WSD need the step count
        **option_args(spec), **loss_args(spec),
        seed=t.seed, data_seed=t.seed, bf16=r.precision == "bf16", fp16=r.precision == "fp16",
        tf32=tf32_arg(cuda and r.cuda, major),  # TF32 for the fp32 matmuls on Ampere+ (issue 19 item 15)
        # FSDP2 full fine-tuning checkpoints with FSDP's own wrapper instead (fsdp.accelerate_fsdp_config).
        **checkpointing_args(uses_hf_checkpointing(spec)), **_fsdp_args(spec, batch.gradient_accumulation_steps),
        logging_steps=spec.logging.logging_steps, report_to="none", disable_tqdm=True,
        save_strategy="steps" if spec.checkpoint.save_steps else "no", save_steps=spec.checkpoint.save_steps or 500,
        save_total_limit=None,  # distsft rotates, and never removes the newest complete checkpoint
        eval_strategy="steps" if (t.eval_steps and spec.data.has_eval) else "no", eval_steps=t.eval_steps,
        load_best_model_at_end=spec.checkpoint.load_best_at_end, metric_for_best_model="eval_loss",
        greater_is_better=False, ignore_data_skip=True, remove_unused_columns=False, packing=False,
        dataset_kwargs={"skip_prepare_dataset": True}, average_tokens_across_devices=True,
        use_cpu=not r.cuda, ddp_backend=None if r.cuda or e.world_size == 1 else "gloo",
        ddp_find_unused_parameters=False, deepspeed=ds_config,
        dataloader_num_workers=0, max_length=spec.data.max_length, save_only_model=False,
        ddp_timeout=process_group_timeout_s(spec),
    )


def option_args(spec: Any) -> dict[str, Any]:
    """Optimizer, kernels and run name, passed through to TRL/HF under their own names."""
    t = spec.train
    return {"optim": t.optim, "adam_beta1": t.adam_beta1, "adam_beta2": t.adam_beta2,
            "adam_epsilon": t.adam_epsilon, "torch_compile": t.torch_compile,
            "use_liger_kernel": spec.model.use_liger_kernel, "run_name": rundir.run_name(spec)}


def loss_args(spec: Any) -> dict[str, Any]:
    """Loss options under TRL's names. The router loss is distsft's own (train.losses.LossComputer, which
    masks padding and packing correctly), so TRL's is off: its coefficient 0.0 also keeps TRL's fused head
    from computing the aux loss with the packed 4-D mask, which transformers' function cannot read."""
    t = spec.train
    return {"loss_type": t.loss_type, "neftune_noise_alpha": t.neftune_noise_alpha, "router_aux_loss_coef": 0.0}


def checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing exactly as the spec says (TRL's own default is on), with
    use_reentrant=False, under the name this transformers version uses."""
    from trl import SFTConfig
    name = "activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def _parallelism(r: Any) -> Any:
    """accelerate's ParallelismConfig for distributed.sequence_parallel_size (None at 1): Ulysses under
    DeepSpeed (train.seqpar, which also makes its registration keep packed examples apart), FSDP2's
    ring attention (context parallelism over the data-parallel shards) otherwise."""
    S = r.batch.sequence_parallel_size
    if S == 1:
        return None
    if r.spec.distributed.backend == "deepspeed":
        from distsft.train.seqpar import parallelism_config
        return parallelism_config(S, r.attn)
    from accelerate.parallelism_config import ParallelismConfig
    return ParallelismConfig(dp_shard_size=r.batch.data_parallel_size, cp_size=S, cp_backend="torch")


def _fsdp_args(spec: Any, accumulation: int) -> dict[str, Any]:
    """FSDP2's plugin arguments, and sync_each_batch for gradient accumulation (fsdp.sync_each_batch);
    the layer classes and the mixed-precision policy are filled in from the loaded model
    (fsdp.wrap_layers_of) before the Trainer builds accelerate's FSDP plugin from them."""
    if spec.distributed.backend != "fsdp":
        return {}
    from distsft.train import fsdp
    fsdp.allow_cpu_fsdp()  # CPU ranks only; patches nothing where there is an accelerator
    extra = {"accelerator_config": acc} if (acc := fsdp.accelerator_config(spec, accumulation)) else {}
    return {"fsdp": True, "fsdp_config": fsdp.trainer_fsdp_config(spec, []), **extra}
