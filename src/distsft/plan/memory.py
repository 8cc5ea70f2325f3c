"""Per-GPU memory estimate of a run, for the plan printout. An estimate, not a measurement.

Model states (weights, gradients, optimizer states) for full fine-tuning under ZeRO-2/3 come from
DeepSpeed's own estimators; DDP and ZeRO-1, which DeepSpeed does not estimate, use the same byte
accounting. LoRA/QLoRA split the model into frozen base weights and trainable adapters. Activations use
the per-layer formula of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models"): 34·s·b·h bytes per layer in 16-bit, i.e. 17 values per hidden unit per token, without the
attention-score term since flash/SDPA kernels do not store scores. All sizes are GiB (2^30 bytes).

The model is never loaded: its config is read and the model built on the meta device to count
parameters and find the linear layers. Anything that cannot be read gives None ("unknown" in the plan).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distsft.plan import ckpt_size
if TYPE_CHECKING:  # only a type here: plan.report -> plan.batch -> plan.fit (auto) -> plan.memory
    from distsft.plan.report import Plan
from distsft.config.spec import RunSpec

GIB = 2**30
# Mixed-precision Adam under DDP: fp32 weights 4 + fp32 grads 4 + Adam m, v 8 (autocast keeps no
# 16-bit copy of the weights).
DDP_BYTES_PER_PARAM = 16
# 4-bit NF4 weights (0.5 bytes) plus the double-quantised block constants, per quantised parameter.
QLORA_BYTES_PER_PARAM = 0.55
ACT_VALUES_PER_HIDDEN = 17
# Per-stage table rows: label -> (stage, offload_optimizer, offload_params).
STAGES: dict[str, tuple[int, bool, bool]] = {
    "ddp": (0, False, False),
    "zero1": (1, False, False),
    "zero1+offload_opt": (1, True, False),
    "zero2": (2, False, False),
    "zero2+offload_opt": (2, True, False),
    "zero3": (3, False, False),
    "zero3+offload_opt": (3, True, False),
    "zero3+offload_all": (3, True, True),
    # FSDP2 shards weights, gradients and optimizer states like ZeRO-3 (one gathered layer at a time);
    # its CPU offload moves all three, like ZeRO-3's full offload. Estimated with the same accounting.
    "fsdp": (3, False, False),
    "fsdp+offload": (3, True, True),
}


@dataclass(frozen=True)
class ModelShape:
    num_parameters: int
    largest_layer_parameters: int  # DeepSpeed's notion: the most parameters held by one module itself
    hidden_size: int
    num_layers: int
    vocab_size: int
    # (module name, in_features, out_features) of every nn.Linear except the output projection (lm_head).
    linear_layers: tuple[tuple[str, int, int], ...]
    # Parameters that multiply (all but an input embedding not tied to the head): FLOPs per token.
    matmul_parameters: int | None = None
    # Mixture of experts: the routed experts' parameters (all of them), the layout, and the fused stacks
    # (name, shape) that PEFT's target_parameters can adapt.
    expert_parameters: int = 0
    moe: Any = None  # config.moe.MoE
    expert_stacks: tuple[tuple[str, tuple[int, ...]], ...] = ()
    moe_blocks: int = 0

    @property
    def num_active_parameters(self) -> int:
        from distsft.config.moe import active_parameters
        return active_parameters(self.num_parameters, self.expert_parameters, self.moe)



def _config(name_or_path: str, trust_remote_code: bool, local_files_only: bool, config: dict[str, Any] | None) -> Any:
    """The model's config: the dict given, else its config.json (local or cached), else the one bundled
    with distsft (plan.models), so that a hub id plans offline without a download."""
    from transformers import AutoConfig
    if config is not None:
        return AutoConfig.for_model(**dict(config))
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                          local_files_only=local_files_only)
    except Exception:
        from distsft.plan.models import lookup
        bundled = lookup(name_or_path)
        if bundled is None:
            raise
        return AutoConfig.for_model(**dict(bundled.config))


def model_shape(name_or_path: str, trust_remote_code: bool = False,
                local_files_only: bool = True, config: dict[str, Any] | None = None) -> ModelShape | None:
    """Shape of a causal LM from its config alone (`config`, a config.json's contents, when given).
    `local_files_only` (default) avoids the hub: an unreachable hub costs ~25 s of retries before
    failing, too slow for a plan."""
    try:
        import torch.nn as nn
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        config = _config(name_or_path, trust_remote_code, local_files_only, config)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        # from_config leaves tied weights (lm_head = embedding) untied on the meta device; tying inside
        # init_empty_weights would register a fresh copy again.
        model.tie_weights()
        text = config.get_text_config()
        output = model.get_output_embeddings()
        # parameters() yields tied weights (embedding = lm_head) once.
        total = sum(p.numel() for p in model.parameters())
        largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
        linears = tuple((name, m.in_features, m.out_features) for name, m in model.named_modules()
                        if isinstance(m, nn.Linear) and m is not output)
        emb = model.get_input_embeddings().weight
        lookup = 0 if emb is getattr(output, "weight", None) else emb.numel()
        from distsft.config.moe import active_parameters, is_expert_parameter, moe_of
        layout = moe_of(config)
        experts = sum(p.numel() for n, p in model.named_parameters() if is_expert_parameter(n)) if layout else 0
        stacks = tuple((n, tuple(p.shape)) for n, p in model.named_parameters()
                       if layout and is_expert_parameter(n) and p.dim() == 3)
        blocks = sum(1 for m in model.modules() if isinstance(getattr(m, "experts", None), nn.Module))
        layout = layout if experts else None
        # FLOPs per token count the active parameters: top_k / num_experts of the routed experts
        return ModelShape(total, largest, int(text.hidden_size), int(text.num_hidden_layers),
                          int(text.vocab_size), linears,
                          matmul_parameters=active_parameters(total, experts, layout) - lookup,
                          expert_parameters=experts, moe=layout, expert_stacks=stacks, moe_blocks=blocks)
    except Exception:  # offline hub id, gated repo, unknown architecture: the plan shows "unknown"
        return None


def _targeted(name: str, targets: list[str] | str) -> bool:
    if targets == "all-linear":
        return True
    # PEFT's rule for a list of names: the module name equals a target or ends with "." + target.
    return any(name == t or name.endswith("." + t) for t in targets)


def lora_trainable_parameters(shape: ModelShape, r: int, target_modules: list[str] | str,
                              target_parameters: list[str] | None = None) -> int:
    """A and B matrices of rank r on each targeted linear layer: r·(in + out) parameters; on a fused
    expert stack [E, a, b] adapted through target_parameters, PEFT's r·E·(a + b). `all-linear` leaves an
    MoE's routers alone (train.moe.lora_targets); they are not nn.Linear in these models anyway."""
    n = sum(r * (i + o) for name, i, o in shape.linear_layers if _targeted(name, target_modules))
    return n + sum(r * s[0] * (s[1] + s[2]) for name, s in shape.expert_stacks
                   if _targeted(name, list(target_parameters or [])))


def trainable_states_bytes(params: int, largest_layer: int, stage: int, offload_optimizer: bool,
                           offload_params: bool, gpus_per_node: int, nodes: int) -> tuple[int, int]:
    """(GPU bytes per GPU, CPU bytes per node) for weights + grads + Adam states of `params`
    trainable parameters."""
    # DeepSpeed's own accounting, without importing DeepSpeed (seconds, and a notice on every plan).
    from distsft.plan.zero_states import zero2 as estimate_zero2_model_states_mem_needs
    from distsft.plan.zero_states import zero3 as estimate_zero3_model_states_mem_needs

    world = gpus_per_node * nodes
    if stage == 0:
        return DDP_BYTES_PER_PARAM * params, 0
    if stage == 3:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            params, largest_layer, gpus_per_node, nodes, cpu_offload=offload_optimizer,
            # DeepSpeed's estimator knows parameter offload only together with optimizer offload;
            # parameter offload alone is estimated as no offload (an upper bound).
            cpu_offload_params=offload_params and offload_optimizer, zero_init=True)
        return gpu, cpu
    cpu, gpu = estimate_zero2_model_states_mem_needs(params, gpus_per_node, nodes, cpu_offload=offload_optimizer)
    if stage == 1:
        # ZeRO-1 keeps the full 16-bit gradients on every GPU, which ZeRO-2 partitions: the 2 bytes
        # per parameter of the gradient partition become 2 bytes per parameter unpartitioned.
        gpu += 2 * params - (0 if offload_optimizer else 2 * params // world)
    return gpu, cpu


def frozen_weights_bytes(params: int, bytes_per_param: float, largest_layer: int, stage: int,
                         offload_params: bool, world: int) -> int:
    """Frozen (LoRA base) weights per GPU: replicated below ZeRO-3; under ZeRO-3 partitioned plus
    one gathered layer (DeepSpeed counts it at 4 bytes/param), or only that layer when offloaded."""
    if stage < 3:
        return int(params * bytes_per_param)
    gathered = 4 * largest_layer
    return gathered if offload_params else int(params * bytes_per_param / world) + gathered


def act_values_per_hidden(shape: ModelShape) -> float:
    """Stored values per hidden unit per token in one layer: Korthikanti's 17, whose MLP part (9.5: input,
    the 4h up-projection, the activation, dropout) assumes a dense 4h MLP. A mixture of experts stores,
    per token, the block input, the router's logits and probabilities, and for each of its top_k experts
    the gathered input and the expert's output before weighting (2h) and the gated 2m up-projection,
    the activation and the product (4m; m = the expert width) -- transformers' per-expert loop."""
    if shape.moe is None or not shape.moe_blocks:
        return ACT_VALUES_PER_HIDDEN
    h, layout = shape.hidden_size, shape.moe
    width = shape.expert_parameters / (shape.moe_blocks * layout.num_experts * 3 * h)  # gate, up, down: 3·h·m
    mlp = h + 2 * layout.num_experts + layout.top_k * (2 * h + 4 * width)
    return ACT_VALUES_PER_HIDDEN - 9.5 + mlp / h


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, gradient_checkpointing: bool,
                     bytes_per_value: int) -> int:
    """Without checkpointing every layer keeps 17·h values per token; with it each layer keeps only
    its input (h values) and one layer at a time is recomputed in full. Plus the logits, in the
    compute dtype and upcast to fp32 for the loss."""
    tokens = micro_batch * seq_len
    layer = tokens * shape.hidden_size * act_values_per_hidden(shape) * bytes_per_value
    if gradient_checkpointing:
        body = shape.num_layers * tokens * shape.hidden_size * bytes_per_value + layer
    else:
        body = shape.num_layers * layer
    return body + tokens * shape.vocab_size * (bytes_per_value + 4)


def _per_gpu(spec: RunSpec, shape: ModelShape, stage: int, offload_optimizer: bool, offload_params: bool,
             world: int) -> tuple[int, int, int]:
    """(GPU model-state bytes, CPU bytes per node, trainable parameters) for one stage/offload choice."""
    nodes = spec.distributed.nodes if world % spec.distributed.nodes == 0 else 1
    gpn = world // nodes
    method = spec.peft.method
    if method == "none":
        gpu, cpu = trainable_states_bytes(shape.num_parameters, shape.largest_layer_parameters, stage,
                                          offload_optimizer, offload_params, gpn, nodes)
        return gpu, cpu, shape.num_parameters
    trainable = lora_trainable_parameters(shape, spec.peft.r, spec.peft.target_modules, spec.peft.target_parameters)
    # Adapters are tiny layers: no largest-layer gather buffer of their own.
    gpu, cpu = trainable_states_bytes(trainable, 0, stage, offload_optimizer, offload_params, gpn, nodes)
    fp32 = spec.train.bf16 is False and not spec.train.fp16
    wbytes = 4 if fp32 else 2
    if method == "qlora":
        quantised = sum(i * o for _, i, o in shape.linear_layers)
        frozen = int(quantised * QLORA_BYTES_PER_PARAM + (shape.num_parameters - quantised - shape.expert_parameters) * 2)
        frozen += int(shape.expert_parameters * qlora_expert_bytes(spec, shape, stage == 3))
        if stage == 3:  # sharded QLoRA (4-bit storage in bf16 elements): a shard plus one gathered layer
            frozen = frozen // world + 2 * shape.largest_layer_parameters
    else:
        frozen = frozen_weights_bytes(shape.num_parameters, wbytes, shape.largest_layer_parameters, stage,
                                      offload_params, world)
    return gpu + frozen, cpu, trainable


def unsharded_grad_bytes(spec: RunSpec, trainable: int, accumulation: int, bytes_per_value: int) -> int:
    """FSDP2 with gradient accumulation and `distributed.sync_each_batch: false`: HF's no_sync keeps the
    whole unsharded gradient (in the compute dtype) on every GPU between micro-batches. 0 otherwise:
    with sync_each_batch (distsft's default, train.fsdp.sync_each_batch) each micro-batch is
    reduce-scattered into the sharded gradient already counted."""
    if accumulation <= 1 or spec.distributed.sync_each_batch is not False:
        return 0
    return trainable * bytes_per_value


def check_model_options(spec: RunSpec, shape: ModelShape) -> None:
    """An MoE option on a dense model, refused at plan time already (the ranks check it again after
    loading, with target_parameters, which need every parameter's name: train.moe.prepare)."""
    from distsft.errors import SpecError
    if spec.train.router_aux_loss_coef is not None and shape.moe is None:
        raise SpecError(f"train.router_aux_loss_coef: {spec.model.name_or_path} is not a mixture-of-experts "
                        "model; remove the option")


def qlora_expert_bytes(spec: RunSpec, shape: ModelShape, sharded: bool) -> float:
    """Bytes per routed-expert weight under QLoRA, as train.moe.prepare leaves them: NF4 unless sharded
    (bf16: FSDP2 / ZeRO-3 shard what was loaded) or adapted through target_parameters (then PEFT's
    prepare_model_for_kbit_training upcasts them to fp32)."""
    if sharded:
        return 2.0
    adapted = any(_targeted(name, list(spec.peft.target_parameters)) for name, _ in shape.expert_stacks)
    return 4.0 if adapted else QLORA_BYTES_PER_PARAM


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def estimate(spec: RunSpec, plan: Plan | None = None, *, shape: ModelShape | None = None,
             local_files_only: bool = True) -> dict[str, Any] | None:
    """Estimated memory per GPU of the spec's run (at the plan's world size), and the same for every
    ZeRO stage/offload choice and FSDP2 ("per_stage_gb", total GiB per GPU), and the size of one
    checkpoint per rank and per node ("checkpoint", ckpt_size.py). None when the model's config cannot
    be read."""
    if shape is None:
        shape = model_shape(spec.model.name_or_path, spec.model.trust_remote_code, local_files_only)
        if shape is None:
            return None
    check_model_options(spec, shape)
    d = spec.distributed
    world = plan.world_size if plan else d.nodes * d.gpus_per_node
    bytes_per_value = 4 if spec.train.bf16 is False and not spec.train.fp16 else 2
    micro = spec.train.per_device_train_batch_size
    if micro == "auto":  # the plan holds what auto resolved to
        micro = plan.per_device_train_batch_size if plan else 1
    # Sequence parallelism: each GPU of a group holds 1/S of the row's tokens (and their activations).
    S = d.sequence_parallel_size
    act = activation_bytes(shape, micro, -(-spec.data.max_length // S),
                           spec.train.gradient_checkpointing, bytes_per_value)
    accumulation = plan.gradient_accumulation_steps if plan else 1
    per_stage = {}
    for label, (stage, opt, par) in STAGES.items():
        gpu, _, trainable = _per_gpu(spec, shape, stage, opt, par, world)
        if label.startswith("fsdp"):
            gpu += unsharded_grad_bytes(spec, trainable, accumulation, bytes_per_value)
        per_stage[label] = _gib(gpu + act)
    gpu, cpu, trainable = _per_gpu(spec, shape, d.stage, d.offload_optimizer, d.offload_params, world)
    if d.backend == "fsdp":
        gpu += unsharded_grad_bytes(spec, trainable, accumulation, bytes_per_value)
    return {
        "num_parameters": shape.num_parameters,
        "num_active_parameters": shape.num_active_parameters,
        "trainable_parameters": trainable,
        "matmul_parameters": shape.matmul_parameters,
        "model_states_gb": _gib(gpu),
        "activations_gb": _gib(act),
        "total_gb": _gib(gpu + act),
        "cpu_gb": _gib(cpu),
        "per_stage_gb": per_stage,
        "checkpoint": ckpt_size.estimate(spec, trainable, world),
        "note": "estimate (GiB per GPU; cpu_gb per node): model states + activations, excluding the CUDA "
                "context, allocator fragmentation and communication buffers",
    }
