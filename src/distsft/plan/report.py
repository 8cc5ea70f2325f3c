"""The plan `distsft plan` prints and the ranks log: batch, steps and data figures for one spec, with
hints (never failures) about hyperparameters far from what usually works."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from distsft.config.spec import RunSpec
from distsft.errors import SpecError
from distsft.plan.batch import batch_for, steps, warmup_steps


@dataclass
class Plan:
    nodes: int
    gpus_per_node: int
    world_size: int
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    global_batch_size: int
    backend: str
    zero_stage: int
    learning_rate: float
    num_examples: int | None = None
    num_tokens: int | None = None
    num_loss_tokens: int | None = None
    num_packed_rows: int | None = None
    packing_efficiency: float | None = None
    steps_per_epoch: int | None = None
    total_steps: int | None = None
    warmup_steps: int | None = None
    tokens_per_step: float | None = None
    memory_gb_per_gpu: dict[str, float] = field(default_factory=dict)
    # sequence parallelism (config.seqpar.figures): each GPU holds 1/S of a row's tokens and activations
    sequence_parallel_size: int = 1
    data_parallel_size: int = 1
    tokens_per_gpu_per_micro_batch: int | None = None
    activation_share: float = 1.0
    num_parameters: int | None = None
    # plan.estimate: {tokens_per_second_per_gpu, source: measured|assumed, hours, gpu_hours, ...}
    estimate: dict[str, Any] | None = None
    num_active_parameters: int | None = None  # MoE: dense part + top_k / num_experts of the experts
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(spec: RunSpec, data_stats: dict[str, Any] | None = None) -> Plan:
    b = batch_for(spec)
    d = spec.distributed
    plan = Plan(nodes=d.nodes, gpus_per_node=d.gpus_per_node, world_size=b.world_size,
                per_device_train_batch_size=b.per_device_train_batch_size,
                gradient_accumulation_steps=b.gradient_accumulation_steps,
                global_batch_size=b.global_batch_size, backend=d.backend, zero_stage=d.stage,
                learning_rate=float(spec.train.learning_rate or 0.0))
    from distsft.config import seqpar
    for k, v in seqpar.figures(b.sequence_parallel_size, b.world_size, b.per_device_train_batch_size,
                               spec.data.max_length).items():
        setattr(plan, k, v)
    errors, long_warnings = seqpar.plan_checks(spec, b.world_size, seqpar.model_limits(
        spec.model.name_or_path, spec.model.trust_remote_code))
    for error in errors:
        raise SpecError(error)
    if spec.train.max_steps > 0:
        plan.total_steps = spec.train.max_steps
        plan.warmup_steps = warmup_steps(plan.total_steps, spec.train.warmup_ratio)
    if data_stats:
        rows = int(data_stats["num_rows"])
        plan.num_examples = int(data_stats["num_examples"])
        plan.num_tokens = int(data_stats["num_tokens"])
        plan.num_loss_tokens = int(data_stats.get("num_loss_tokens", 0)) or None
        plan.num_packed_rows = rows
        plan.packing_efficiency = float(data_stats["packing_efficiency"])
        plan.steps_per_epoch, plan.total_steps = steps(rows, b.global_batch_size, spec.train.num_train_epochs,
                                                       spec.train.max_steps, data_stats.get("drops_explained", ""))
        plan.warmup_steps = warmup_steps(plan.total_steps, spec.train.warmup_ratio)
        plan.tokens_per_step = plan.num_tokens / rows * b.global_batch_size if rows else None
    plan.warnings = hyperparameter_warnings(spec, plan) + long_warnings
    return plan


def hyperparameter_warnings(spec: RunSpec, plan: Plan, num_parameters: int | None = None) -> list[str]:
    """Hints, never failures: each hyperparameter outside the recommended range for the model's size
    and method (plan.recommend, the one table), and values far outside what usually works for SFT."""
    from distsft.plan.recommend import warnings as table_warnings
    t = spec.train
    w = table_warnings(spec, num_parameters, plan.global_batch_size)
    lora = spec.peft.method != "none"
    said = " ".join(w)  # the table's range warning, when there is one, says it already
    if t.warmup_ratio > 0.3 and "train.warmup_ratio" not in said:
        w.append(f"train.warmup_ratio={t.warmup_ratio} is long; SFT usually warms up over 1–10% of steps")
    if t.weight_decay > 0.3 and "train.weight_decay" not in said:
        w.append(f"train.weight_decay={t.weight_decay} is unusually high for SFT (typical 0–0.1)")
    if t.max_grad_norm == 0:
        w.append("train.max_grad_norm=0 disables gradient clipping; 1.0 is the usual SFT setting")
    if plan.global_batch_size > 2048 and "effective batch" not in said:
        w.append(f"global batch {plan.global_batch_size} is very large for SFT (typical 16–512)")
    if plan.total_steps is not None and plan.total_steps < 10:
        w.append(f"only {plan.total_steps} optimizer steps: the schedule (warmup, decay) barely applies")
    if lora and spec.peft.r > 256:
        w.append(f"peft.r={spec.peft.r} is unusually large for LoRA (typical 8–128)")
    if spec.data.has_eval and not t.eval_steps:
        what = "data.val_set_size" if spec.data.val_set_size else "the eval sets (data.eval_files / data.eval_sources)"
        w.append(f"{what} without train.eval_steps: evaluated once, at the end of training (set train.eval_steps "
                 "to evaluate during training)")
    if plan.num_tokens and plan.num_examples and plan.num_tokens / plan.num_examples < 4:
        w.append("examples average fewer than 4 tokens: check data.format and the column names")
    return w
