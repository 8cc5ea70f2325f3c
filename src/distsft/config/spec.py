"""The run spec: one YAML file, validated by pydantic, with `section.key=value` overrides.

Every error a user can cause here becomes a `SpecError` whose message names the dotted key (and the
YAML line when the key came from the file); the CLI turns it into exit code 2.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from distsft.errors import SpecError
from distsft.config.spec_yaml import apply_overrides, format_errors, line_index

SAFE_SHELL_WORD = re.compile(r"^[A-Za-z0-9_.,:=@%+/\-\[\]]*$")
from distsft.config.sections import DataSpec, ModelSpec, PeftSpec, Section, TrainSpec


class DistributedSpec(Section):
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=1)
    backend: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    zero_stage: int | None = Field(None, ge=0, le=3)
    offload_optimizer: bool = False
    # ZeRO-3 parameter offload, or FSDP2's CPU offload (parameters, gradients and optimizer states).
    offload_params: bool = False
    # FSDP2 only: free each layer's gathered weights after its forward (true, ZeRO-3-like) or keep them
    # until the backward (false, ZeRO-2-like: more memory, one all-gather fewer per layer).
    reshard_after_forward: bool = True
    main_process_port: int | None = Field(None, ge=1024, le=65535)
    # The process group's timeout for collectives (DDP and DeepSpeed); data builds never run inside one.
    timeout_minutes: int = Field(30, ge=1)
    # GPUs that share one sequence (Ulysses under deepspeed, ring attention under fsdp; config.seqpar).
    sequence_parallel_size: int = Field(1, ge=1)
    # GiB per GPU, for planning on a machine without the job's GPUs (`per_device_train_batch_size: auto`,
    # distsft init); where the ranks run their GPU is measured instead when this is not set.
    gpu_memory_gb: float | None = Field(None, gt=0)
    sync_each_batch: bool | None = None  # FSDP2 accumulation: reduce-scatter each micro-batch (train.fsdp)

    @model_validator(mode="after")
    def _check(self) -> "DistributedSpec":
        if self.sync_each_batch is not None and self.backend != "fsdp":
            raise ValueError("distributed.sync_each_batch is an FSDP2 setting (distributed.backend: fsdp); DDP "
                             "and DeepSpeed accumulate gradients their own way")
        if self.backend == "ddp":
            if self.zero_stage not in (None, 0):
                raise ValueError(f"distributed.zero_stage={self.zero_stage} needs distributed.backend: deepspeed")
            if self.offload_optimizer or self.offload_params:
                key = "offload_optimizer" if self.offload_optimizer else "offload_params"
                raise ValueError(f"distributed.{key} needs distributed.backend: deepspeed (ZeRO offload)"
                                 + (" or fsdp" if key == "offload_params" else ""))
        if self.backend == "fsdp":
            if self.zero_stage not in (None, 3):
                raise ValueError(f"distributed.zero_stage={self.zero_stage} is a DeepSpeed setting; FSDP2 always "
                                 "shards weights, gradients and optimizer states (use reshard_after_forward)")
            if self.offload_optimizer:
                raise ValueError("distributed.offload_optimizer is a DeepSpeed setting; with backend: fsdp use "
                                 "distributed.offload_params (FSDP2's CPU offload moves the optimizer states too)")
            return self
        if not self.reshard_after_forward:
            raise ValueError("distributed.reshard_after_forward needs distributed.backend: fsdp")
        if self.offload_params and self.stage < 3:
            raise ValueError("distributed.offload_params needs distributed.zero_stage: 3")
        if self.offload_optimizer and self.stage < 1:
            raise ValueError("distributed.offload_optimizer needs distributed.zero_stage >= 1")
        return self

    @property
    def stage(self) -> int:
        """ZeRO stage in effect: 0 under DDP, 2 when DeepSpeed is chosen without a stage; FSDP2 shards
        like ZeRO-3 (weights, gradients, optimizer states)."""
        if self.backend == "ddp":
            return 0
        if self.backend == "fsdp":
            return 3
        return 2 if self.zero_stage is None else self.zero_stage


def _shell_safe(value: str, key: str) -> str:
    if not SAFE_SHELL_WORD.match(value):
        raise ValueError(f"slurm.{key}={value!r} holds characters that a shell would interpret "
                         "(only letters, digits and _.,:=@%+/-[] are allowed)")
    return value


class SlurmSpec(Section):
    job_name: str = "distsft"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_min: int = Field(60, ge=1)
    constraint: str | None = None
    # mem_gb, cpus_per_task, request_gpus (--gpus-per-node): derived when unset (launch.slurm_resources)
    mem_gb: int | None = Field(None, ge=1)
    cpus_per_task: int | None = Field(None, ge=1)
    request_gpus: bool | None = None
    checkpoint_write_gbps: float | None = Field(None, gt=0)  # per node: plan.preempt_window's speed
    # The only spec value that runs as shell: lines run before training (module load, conda activate).
    setup: list[str] = Field(default_factory=list)
    max_requeues: int = Field(3, ge=0)
    signal_delay_s: int = Field(120, ge=0)
    additional_parameters: dict[str, str | int | bool] = Field(default_factory=dict)

    @field_validator("job_name", "partition", "account", "qos", "constraint")
    @classmethod
    def _safe(cls, v: str | None, info: Any) -> str | None:
        return None if v is None else _shell_safe(v, info.field_name)

    @field_validator("additional_parameters")
    @classmethod
    def _safe_extra(cls, v: dict[str, Any]) -> dict[str, Any]:
        for k, val in v.items():
            if not re.match(r"^[a-z][a-z0-9_]*$", k):
                raise ValueError(f"slurm.additional_parameters key {k!r} is not an sbatch option name "
                                 "(lower case letters, digits and _, e.g. mail_type)")
            if isinstance(val, str):
                _shell_safe(val, f"additional_parameters.{k}")
        return v


REPORTERS = Literal["jsonl", "tensorboard", "wandb"]


class LoggingSpec(Section):
    report_to: list[REPORTERS] = Field(default_factory=lambda: ["jsonl"])  # type: ignore[valid-type]
    logging_steps: int = Field(10, ge=1)
    generation_steps: int | None = Field(None, ge=1)
    generation_prompts: list[str] = Field(default_factory=list)
    generation_max_new_tokens: int = Field(32, ge=1)
    wandb_project: str | None = None
    # The run's name: W&B run name, TensorBoard subdirectory (tensorboard/RUN_NAME), run_record.jsonl.
    # Default: the output_dir's name (and tensorboard/ itself).
    run_name: str | None = None
    wandb_entity: str | None = None
    wandb_tags: list[str] = Field(default_factory=list)
    peak_tflops: float | None = Field(None, gt=0.0)  # the device's peak for the mfu metric (else by name)

    @field_validator("run_name")
    @classmethod
    def _run_name(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,127}$", v):
            raise ValueError(f"logging.run_name={v!r} must be a directory name: letters, digits and "
                             "_.+=@- (no / or spaces), at most 128 characters")
        return v

    @field_validator("wandb_tags", mode="before")
    @classmethod
    def _tags(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        v = [x for x in v if x != "none"]
        return v if "jsonl" in v else ["jsonl", *v]


class CheckpointSpec(Section):
    save_steps: int | None = Field(500, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    resume: str = "auto"  # auto | never | PATH to a checkpoint directory
    save_merged: bool = False
    load_best_at_end: bool = False
    early_stopping_patience: int | None = Field(None, ge=1)


class EvalSpec(Section):
    """lm-evaluation-harness after training (`distsft eval`; posttrain/eval.py)."""
    tasks: list[str] = Field(default_factory=list)  # lm-eval task names (registered or under include_path)
    include_path: list[str] | str | None = None  # directories of local task YAMLs (private, offline)
    apply_chat_template: bool | None = None  # None: on for chat-format runs, off for data.format: text
    after_training: bool = False  # evaluate the final model when training ends (see README)

    @model_validator(mode="after")
    def _needs_tasks(self) -> "EvalSpec":
        if self.after_training and not self.tasks:
            raise ValueError("eval.after_training needs eval.tasks")
        return self


class RunSpec(Section):
    model: ModelSpec
    data: DataSpec
    peft: PeftSpec = Field(default_factory=PeftSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    distributed: DistributedSpec = Field(default_factory=DistributedSpec)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    logging: LoggingSpec = Field(default_factory=LoggingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    output_dir: str = "outputs/run"

    @model_validator(mode="after")
    def _defaults(self) -> "RunSpec":
        if self.train.learning_rate is None:
            self.train.learning_rate = 2e-5 if self.peft.method == "none" else 1e-4
        if self.peft.method == "qlora" and self.train.fp16:
            raise ValueError("peft.method=qlora computes in bf16; set train.fp16: false")
        if self.checkpoint.load_best_at_end:
            if not (self.data.has_eval and self.train.eval_steps):
                raise ValueError("checkpoint.load_best_at_end needs an eval set (data.eval_files, "
                                 "data.eval_sources or data.val_set_size) and train.eval_steps")
            if not self.checkpoint.save_steps or self.checkpoint.save_steps % self.train.eval_steps:
                raise ValueError(f"checkpoint.load_best_at_end needs checkpoint.save_steps "
                                 f"({self.checkpoint.save_steps}) to be a multiple of train.eval_steps "
                                 f"({self.train.eval_steps}), so every saved checkpoint has an eval loss")
        _check_options(self)
        from distsft.config.seqpar import spec_errors
        for error in spec_errors(self)[:1]:
            raise ValueError(error)
        if self.logging.generation_steps and not self.logging.generation_prompts:
            raise ValueError("logging.generation_steps needs logging.generation_prompts")
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _check_options(spec: RunSpec) -> None:
    """PEFT options only mean something with an adapter."""
    p = spec.peft
    if p.method == "none":
        for key, on in (("use_dora", p.use_dora), ("use_rslora", p.use_rslora),
                        ("modules_to_save", p.modules_to_save), ("exclude_modules", p.exclude_modules),
                        ("target_parameters", p.target_parameters)):
            if on:
                raise ValueError(f"peft.{key} needs peft.method: lora or qlora")


def load_spec(path: str | Path, overrides: list[str] | None = None,
              nodes: int | None = None, gpus: int | None = None) -> RunSpec:
    """Read, override and validate a spec. `nodes`/`gpus` override `distributed` (CLI flags)."""
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"spec file not found: {p}")
    text = p.read_text()
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpecError(f"{p}: invalid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise SpecError(f"{p}: the spec must be a mapping of sections (model:, data:, train:, ...)")
    touched = apply_overrides(raw, list(overrides or []))
    # Relative paths: from the spec's directory; those given on the command line from the working one.
    from .paths import resolve_paths
    raw.setdefault("output_dir", RunSpec.model_fields["output_dir"].default)  # the default too: from the spec's dir
    resolve_paths(raw, p.resolve().parent, touched)
    dist = raw.setdefault("distributed", {}) if (nodes or gpus) else None
    if isinstance(dist, dict):
        if nodes:
            dist["nodes"] = nodes
            touched.add(("distributed", "nodes"))
        if gpus:
            dist["gpus_per_node"] = gpus
            touched.add(("distributed", "gpus_per_node"))
    lines = line_index(text)
    spec = validate(raw, source=str(p), lines=lines, overridden=touched)
    from .templates import check_spec_template
    check_spec_template(spec, str(p), lines, touched)  # a bare name: shipped, or a local tokenizer's variant
    return spec


def validate(raw: dict[str, Any], source: str = "spec", lines: dict[tuple[str, ...], int] | None = None,
             overridden: set[tuple[str, ...]] | None = None) -> RunSpec:
    try:
        return RunSpec.model_validate(raw)
    except ValidationError as err:
        raise SpecError(format_errors(err, lines or {}, source, overridden or set())) from None


def dump_spec(spec: RunSpec, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
