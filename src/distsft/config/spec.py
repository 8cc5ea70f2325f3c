"""The run spec: one YAML file, validated by pydantic, with `section.key=value` overrides.

Every error a user can cause here becomes a `SpecError` whose message names the dotted key (and the
YAML line when the key came from the file); the CLI turns it into exit code 2.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from distsft.errors import SpecError
from distsft.config.schedules import SCHEDULERS  # HF scheduler names; their spec-derived kwargs live there too
from distsft.config.spec_yaml import apply_overrides, format_errors, line_index

SAFE_SHELL_WORD = re.compile(r"^[A-Za-z0-9_.,:=@%+/\-\[\]]*$")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Section):
    name_or_path: str = Field(min_length=1)
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    torch_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False
    # Tokens to add as special tokens (e.g. a chat template's markers the base model lacks): the
    # embeddings are resized, the new rows start at the mean of the old ones, and they train (LoRA too).
    add_special_tokens: list[str] = Field(default_factory=list)
    use_liger_kernel: bool = False  # Liger's fused Triton kernels (CUDA only), applied by TRL/HF
    # RoPE scaling (e.g. {rope_type: yarn, factor: 4, original_max_position_embeddings: 32768}), merged
    # over the config's own rope_parameters; `rope_scaling` is the older transformers name.
    rope_parameters: dict[str, Any] | None = Field(
        None, validation_alias=AliasChoices("rope_parameters", "rope_scaling"))

    @field_validator("add_special_tokens", mode="before")
    @classmethod
    def _tokens(cls, v: Any) -> Any:
        v = [v] if isinstance(v, str) else v
        if isinstance(v, list) and any(not isinstance(t, str) or not t.strip() for t in v):
            raise ValueError("model.add_special_tokens must be a list of non-empty strings")
        return v


class SourceSpec(_Section):
    """One data source of a mixture (data.sources / data.eval_sources)."""
    path: str | None = Field(None, min_length=1)  # a local file, a save_to_disk directory, or a hub dataset id
    subset: str | None = None        # hub config name
    split: str = "train"
    revision: str | None = None      # hub revision (branch, tag or commit)
    format: str | None = None        # as data.format; None: data.format
    columns: dict[str, str] = Field(default_factory=dict)  # {name the format expects: name in this source}
    fraction: float | None = None    # default 1.0; > 1 repeats examples
    count: int | None = None         # exactly this many examples (repeats or subsamples)
    # The data described as other tools describe it (config/peers.py): a LLaMA-Factory dataset_info.json
    # entry (PATH#NAME, filling path, formatting, columns, tags, ...) or its keys inline; or axolotl's
    # chat_template keys. `columns` then holds LLaMA-Factory's column names.
    dataset_info: str | None = None
    formatting: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    field_messages: str | None = None
    message_property_mappings: dict[str, str] = Field(default_factory=dict)
    roles: dict[str, list[str]] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _dataset_info(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("dataset_info"):
            from .peers import expand
            return expand(data)
        return data
    # Training sources: metrics.jsonl logs loss_<label> over this source's tokens (sources may share a
    # label); eval sources: the eval set's name (default: the file or dataset name).
    label: str | None = Field(None, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")

    @model_validator(mode="after")
    def _check(self) -> "SourceSpec":
        if self.path is None:
            raise ValueError("set path (a file, a directory or a hub dataset) or dataset_info (PATH#NAME)")
        from .peers import check
        check(self)
        if self.fraction is not None and self.count is not None:
            raise ValueError(f"source {self.path!r}: set fraction or count, not both")
        if self.fraction is not None and not self.fraction > 0:
            raise ValueError(f"source {self.path!r}: fraction must be > 0 (got {self.fraction})")
        if self.count is not None and self.count < 1:
            raise ValueError(f"source {self.path!r}: count must be >= 1 (got {self.count})")
        return self


class EvalSourceSpec(SourceSpec):
    """An eval set's source; `label` names the set (default: the file or dataset name)."""


class DataSpec(_Section):
    train_files: list[str] = Field(default_factory=list)  # shorthand for sources with default settings
    eval_files: list[str] = Field(default_factory=list)
    sources: list[SourceSpec] = Field(default_factory=list)
    eval_sources: list[EvalSourceSpec] = Field(default_factory=list)
    # Held out from the training mixture before packing: a fraction in (0, 1) or a count.
    val_set_size: int | float | None = None
    num_proc: int | None = Field(None, ge=1)  # tokenizer worker processes; None: the CPUs this process may use
    format: Literal["messages", "sharegpt", "instruction", "prompt_completion", "text"] = "messages"
    # all: every assistant turn as the final render shows it; last: only the final one;
    # split: one example per assistant turn, rendered as the last turn (keeps its reasoning).
    assistant_turns: Literal["all", "last", "split"] = "all"
    messages_column: str = "messages"
    conversations_column: str = "conversations"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    text_column: str = "text"
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    system_prompt: str | None = None
    chat_template: str | None = None
    max_length: int = Field(2048, ge=8)
    packing: bool = True
    overlong: Literal["truncate", "drop"] = "truncate"
    max_train_examples: int | None = Field(None, ge=1)
    cache_dir: str | None = None

    @field_validator("train_files", "eval_files", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("chat_template")
    @classmethod
    def _template(cls, v: str | None) -> str | None:
        from .templates import check
        try:
            check(v)  # a path that exists and holds a template, or a name; the tokenizer decides the rest
        except SpecError as exc:
            raise ValueError(str(exc).removeprefix("data.chat_template: ")) from None
        return v

    @model_validator(mode="after")
    def _check_sources(self) -> "DataSpec":
        for short, full in (("train_files", "sources"), ("eval_files", "eval_sources")):
            if getattr(self, short) and getattr(self, full):
                raise ValueError(f"set data.{short} or data.{full}, not both ({short} is the shorthand "
                                 f"for {full} with default settings)")
        if not self.train_files and not self.sources:
            raise ValueError("set data.train_files or data.sources (the training data)")
        formats = typing.get_args(type(self).model_fields["format"].annotation)
        for key, entries in (("sources", self.sources), ("eval_sources", self.eval_sources)):
            for i, src in enumerate(entries):
                if src.format is not None and src.format not in formats:
                    raise ValueError(f"data.{key}[{i}] ({src.path}): format {src.format!r} is not one of "
                                     f"{', '.join(formats)}")
                from .peers import check_columns
                check_columns(self, f"data.{key}[{i}] ({src.path})", src)
        v = self.val_set_size
        if v is not None and not ((isinstance(v, int) and v >= 1) or (isinstance(v, float) and 0 < v < 1)):
            raise ValueError(f"data.val_set_size must be a fraction in (0, 1) or a count >= 1 (got {v!r})")
        return self

    @property
    def has_eval(self) -> bool:
        """Whether any eval set is configured (eval files, eval sources or a validation split)."""
        return bool(self.eval_files or self.eval_sources or self.val_set_size)


class PeftSpec(_Section):
    method: Literal["none", "lora", "qlora"] = "none"
    r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    use_dora: bool = False
    use_rslora: bool = False  # scale by lora_alpha / sqrt(r) instead of lora_alpha / r
    modules_to_save: list[str] = Field(default_factory=list)  # trained in full and saved with the adapter
    exclude_modules: list[str] | str = Field(default_factory=list)  # names (or one regex) never adapted
    # PEFT's target_parameters: weights that are not nn.Linear, e.g. an MoE's fused experts
    # ([experts.gate_up_proj, experts.down_proj]); each must match a parameter of the model.
    target_parameters: list[str] = Field(default_factory=list)

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _param_targets(self) -> "PeftSpec":
        # PEFT's ParamWrapper (target_parameters) has no dropout: the default dropout yields to it, an
        # explicit one is a conflict.
        if self.target_parameters and self.lora_dropout:
            if "lora_dropout" in self.model_fields_set:
                raise ValueError(f"peft.target_parameters needs peft.lora_dropout: 0 (got {self.lora_dropout}); "
                                 "PEFT adapts parameters without dropout")
            object.__setattr__(self, "lora_dropout", 0.0)
        return self


class TrainSpec(_Section):
    # auto: the largest micro-batch the memory estimate fits on the GPU (plan.fit), accumulation derived
    # so that global_batch_size stays exact; on a GPU a probe step confirms it (train.autobatch).
    per_device_train_batch_size: int | Literal["auto"] = 1
    per_device_eval_batch_size: int | None = Field(None, ge=1)
    gradient_accumulation_steps: int | None = Field(None, ge=1)
    global_batch_size: int | None = Field(None, ge=1)
    # None resolves to 2e-5 for full fine-tuning and 1e-4 for LoRA/QLoRA (see RunSpec._defaults).
    learning_rate: float | None = Field(None, ge=0.0)
    num_train_epochs: float = Field(1.0, gt=0.0)
    max_steps: int = Field(-1, ge=-1)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    lr_scheduler_type: Literal[SCHEDULERS] = "cosine"  # type: ignore[valid-type]
    weight_decay: float = Field(0.01, ge=0.0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    seed: int = 42
    # None: bf16 where the GPU supports it, fp32 on CPU (TRL would otherwise default to bf16 on CPU too).
    bf16: bool | None = None
    fp16: bool = False
    gradient_checkpointing: bool = False
    eval_steps: int | None = Field(None, ge=1)
    optim: str = "adamw_torch"  # any of transformers' OptimizerNames (optim.OPTIMIZERS)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-8, gt=0.0)
    # cosine_with_min_lr (default 0.1) and warmup_stable_decay (default 0): final LR = ratio × peak
    min_lr_ratio: float | None = Field(None, ge=0.0, le=1.0)
    decay_ratio: float | None = Field(None, gt=0.0, le=1.0)  # warmup_stable_decay: share of steps decaying
    torch_compile: bool = False
    activation_offloading: bool = False  # TRL's: activations to CPU memory during forward (GPU only)

    @field_validator("per_device_train_batch_size", mode="before")
    @classmethod
    def _micro(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
            return v
        raise ValueError("must be a positive integer or auto")
    # MoE: weight of the router's load-balancing loss in the optimized loss (None: the model config's)
    router_aux_loss_coef: float | None = Field(None, ge=0.0)
    loss_type: Literal["nll", "dft"] = "nll"  # dft: TRL's Dynamic Fine-Tuning (token NLL × its probability)
    neftune_noise_alpha: float | None = Field(None, gt=0.0)  # NEFTune: uniform noise on input embeddings

    @field_validator("optim")
    @classmethod
    def _optim(cls, v: str) -> str:
        from distsft.config.optim import validate_name
        return validate_name(v)

    @model_validator(mode="after")
    def _check(self) -> "TrainSpec":
        from distsft.config.schedules import DEFAULT_DECAY_RATIO, MIN_LR_SCHEDULERS
        if self.min_lr_ratio is not None and self.lr_scheduler_type not in MIN_LR_SCHEDULERS:
            raise ValueError(f"train.min_lr_ratio applies to lr_scheduler_type {' or '.join(MIN_LR_SCHEDULERS)}, "
                             f"not {self.lr_scheduler_type}")
        if self.decay_ratio is not None and self.lr_scheduler_type != "warmup_stable_decay":
            raise ValueError("train.decay_ratio applies to lr_scheduler_type warmup_stable_decay, "
                             f"not {self.lr_scheduler_type}")
        decay = DEFAULT_DECAY_RATIO if self.decay_ratio is None else self.decay_ratio
        if self.lr_scheduler_type == "warmup_stable_decay" and self.warmup_ratio + decay > 1.0:
            raise ValueError(f"train.warmup_ratio ({self.warmup_ratio}) + train.decay_ratio ({decay}) "
                             "exceed 1: warmup and decay would overlap")
        if self.per_device_train_batch_size == "auto" and self.global_batch_size is None:
            raise ValueError("train.per_device_train_batch_size: auto needs train.global_batch_size (the micro-batch "
                             "is chosen to fit and the accumulation derived, so the global batch stays exact)")
        if self.gradient_accumulation_steps is not None and self.global_batch_size is not None:
            raise ValueError(
                "set at most one of train.gradient_accumulation_steps and train.global_batch_size "
                f"(got {self.gradient_accumulation_steps} and {self.global_batch_size}); "
                "with global_batch_size the accumulation is derived from the GPU count")
        if self.max_steps == 0:
            raise ValueError("train.max_steps must be -1 (use num_train_epochs) or a positive number")
        if self.bf16 and self.fp16:
            raise ValueError("train.bf16 and train.fp16 cannot both be true")
        return self


class DistributedSpec(_Section):
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


class SlurmSpec(_Section):
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


class LoggingSpec(_Section):
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


class CheckpointSpec(_Section):
    save_steps: int | None = Field(500, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    resume: str = "auto"  # auto | never | PATH to a checkpoint directory
    save_merged: bool = False
    load_best_at_end: bool = False
    early_stopping_patience: int | None = Field(None, ge=1)


class EvalSpec(_Section):
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


class RunSpec(_Section):
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
