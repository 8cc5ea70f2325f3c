"""The sections of the run spec that say what to train: the model, the data, PEFT, the training
hyperparameters (pydantic; every section rejects unknown keys). config.spec assembles them, with the
sections that say where and how the run goes, into the RunSpec and loads it from YAML."""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from distsft.errors import SpecError
from distsft.config.schedules import SCHEDULERS  # HF scheduler names; their spec-derived kwargs live there too


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(Section):
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


class SourceSpec(Section):
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


class DataSpec(Section):
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


class PeftSpec(Section):
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


class TrainSpec(Section):
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
