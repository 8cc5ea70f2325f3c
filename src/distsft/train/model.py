"""Model and tokenizer loading: dtype, full / LoRA / QLoRA (the attention backend is chosen in hardware.py)."""

from __future__ import annotations

from typing import Any

import torch

from distsft.config.spec import RunSpec
from distsft.errors import SpecError
from distsft.train.tokens import load_tokenizer

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def weights_dtype(spec: RunSpec, precision: str) -> torch.dtype:
    """auto: fp32 weights for full fine-tuning (the optimizer keeps fp32 masters under autocast),
    half precision for a frozen LoRA/QLoRA base or under DeepSpeed (which keeps its own fp32 copy)."""
    if spec.model.torch_dtype != "auto":
        return _DTYPES[spec.model.torch_dtype]
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if half is not None and (spec.peft.method != "none" or spec.distributed.backend == "deepspeed"):
        return half
    return torch.float32


def is_sharded(spec: RunSpec) -> bool:
    """Weights partitioned across ranks: FSDP2, or DeepSpeed ZeRO-3."""
    return spec.distributed.backend == "fsdp" or (spec.distributed.backend == "deepspeed"
                                                   and spec.distributed.stage == 3)


def check_qlora_runs(device: torch.device) -> None:
    """Fail early and clearly when bitsandbytes cannot quantize on this device."""
    try:
        import bitsandbytes.functional as bnbf
        bnbf.quantize_4bit(torch.ones(64, 64, dtype=torch.bfloat16, device=device), quant_type="nf4")
    except Exception as exc:  # noqa: BLE001 - any failure means the same thing to the user
        raise SpecError(f"peft.method=qlora: bitsandbytes cannot run 4-bit quantization on {device}: "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def rope_config(spec: RunSpec) -> Any:
    """The model's config with `model.rope_parameters` (e.g. YaRN for rows beyond its position range)
    merged over its own RoPE parameters (rope_theta stays unless given); transformers' validation of the
    result applies (an unknown rope_type or a missing factor is a spec error)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    kind = spec.model.rope_parameters.get("rope_type", spec.model.rope_parameters.get("type", "default"))
    if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
        raise SpecError(f"model.rope_parameters.rope_type={kind!r} is not one of transformers' RoPE types: "
                        f"default, {', '.join(sorted(ROPE_INIT_FUNCTIONS))}")
    try:
        cfg = AutoConfig.from_pretrained(spec.model.name_or_path, trust_remote_code=spec.model.trust_remote_code)
        text = cfg.get_text_config()
        name = "rope_parameters" if hasattr(text, "rope_parameters") else "rope_scaling"
        setattr(text, name, {**(getattr(text, name, None) or {}), **spec.model.rope_parameters})
        if hasattr(text, "validate_rope"):
            text.validate_rope()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"model.rope_parameters={spec.model.rope_parameters}: {str(exc).splitlines()[0]}") from None
    return cfg


def load_model(spec: RunSpec, precision: str, attn: str, device: torch.device, tokenizer: Any = None) -> Any:
    from transformers import AutoModelForCausalLM
    from distsft.runtime import dist
    from distsft.train import moe
    # `auto` without flash attention: transformers' own default, sdpa where the architecture has it and
    # eager where not (Gemma-2); the collator then follows what the model got (recipe.build_trainer).
    requested = None if spec.model.attn_implementation == "auto" and attn == "sdpa" else attn
    kwargs: dict[str, Any] = {"attn_implementation": requested, "dtype": weights_dtype(spec, precision),
                              "trust_remote_code": spec.model.trust_remote_code}
    sharded = is_sharded(spec)
    if spec.model.rope_parameters:
        kwargs["config"] = rope_config(spec)
    stored, note = moe.checkpoint_quantization(_config(spec), spec.peft.method)  # gpt-oss MXFP4 experts
    kwargs.update(stored)
    if note:
        dist.print0(f"model: {note}")
    if spec.peft.method == "qlora":
        from transformers import BitsAndBytesConfig
        check_qlora_runs(device)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            # Sharded QLoRA (FSDP-QLoRA): the packed 4-bit weights stored as bf16 elements, the dtype of
            # the other weights, so FSDP2 / ZeRO-3 can flatten and shard them like any parameter.
            **({"bnb_4bit_quant_storage": torch.bfloat16} if sharded else {}))
        kwargs["dtype"] = torch.bfloat16
        if spec.distributed.backend != "deepspeed" or not sharded:
            kwargs["device_map"] = {"": device}  # ZeRO-3 places (partitions) the weights itself
    from distsft.train import rank0_load
    e = dist.env()
    loads = rank0_load.loads_weights(spec.distributed.backend, spec.peft.method, e.world_size, e.rank)
    try:
        # auto: a model without an sdpa path (gpt-oss) loads with eager (train.moe.load_attention)
        if loads:
            model = moe.load_attention(lambda a: AutoModelForCausalLM.from_pretrained(
                spec.model.name_or_path, **{**kwargs, "attn_implementation": requested if a == attn else a}),
                attn, spec.model.attn_implementation)
        else:  # FSDP2: rank 0's values reach this rank's shards when accelerate prepares the model
            model = moe.load_attention(lambda a: rank0_load.empty_model(
                spec.model.name_or_path, kwargs["dtype"], a, spec.model.trust_remote_code), attn,
                spec.model.attn_implementation)
    except (OSError, ValueError) as exc:
        raise SpecError(f"model.name_or_path: cannot load {spec.model.name_or_path!r}: "
                        f"{str(exc).splitlines()[0]}") from None
    new_ids = _new_token_rows(spec, model, tokenizer)
    if spec.peft.method == "qlora" and sharded:
        _keep_4bit_layout(model)
    moe.prepare(spec, model, sharded, dist.print0)  # router loss / target_parameters checks, experts
    if spec.peft.method == "none":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if spec.peft.method == "qlora" and not sharded:
        # Not when sharded: it upcasts the non-quantized weights to fp32, and FSDP2 / ZeRO-3 want one
        # dtype per shard group (the compute dtype, as the 4-bit storage).
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=spec.train.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(r=spec.peft.r, lora_alpha=spec.peft.lora_alpha, lora_dropout=spec.peft.lora_dropout,
                      target_modules=moe.lora_targets(model, spec.peft.target_modules),  # MoE: no routers
                      task_type="CAUSAL_LM", **_lora_options(spec, model, new_ids))
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:  # e.g. a modules_to_save / exclude_modules name the model does not have
        raise SpecError(f"peft: {str(exc).splitlines()[0]} (check peft.target_modules, modules_to_save, "
                        "exclude_modules)") from None
    if new_ids:
        from distsft.train.tokens import expose_head_bias
        expose_head_bias(model)
    return model


def _config(spec: RunSpec) -> Any:
    """The model's config, or None when it cannot be read here (from_pretrained then says why)."""
    from transformers import AutoConfig
    try:
        return AutoConfig.from_pretrained(spec.model.name_or_path, trust_remote_code=spec.model.trust_remote_code)
    except (OSError, ValueError):
        return None


def _new_token_rows(spec: RunSpec, model: Any, tokenizer: Any) -> list[int]:
    """`model.add_special_tokens`: their ids, with embedding rows made for them (tokens.init_new_rows)."""
    if not spec.model.add_special_tokens:
        return []
    from distsft.train.tokens import VOCAB_MULTIPLE, init_new_rows, new_token_ids
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    # Full fine-tuning saves the padded vocabulary with the model; an adapter is reloaded onto a base that
    # PEFT resizes to the tokenizer's length, so LoRA/QLoRA keep exactly that size.
    multiple = VOCAB_MULTIPLE if spec.peft.method == "none" else None
    init_new_rows(model, tokenizer, new_token_ids(tokenizer), multiple)  # rows of tokens already known stay
    return [tokenizer.convert_tokens_to_ids(t) for t in spec.model.add_special_tokens]


def _lora_options(spec: RunSpec, model: Any, new_ids: list[int]) -> dict[str, Any]:
    """DoRA, rsLoRA, modules_to_save, exclude_modules, and the added tokens' rows as trainable tokens."""
    from distsft.train.tokens import trainable_token_indices
    p = spec.peft
    opts: dict[str, Any] = {"use_dora": p.use_dora, "use_rslora": p.use_rslora}
    if p.modules_to_save:
        opts["modules_to_save"] = list(p.modules_to_save)
    if p.exclude_modules:
        opts["exclude_modules"] = p.exclude_modules
    if p.target_parameters:
        opts["target_parameters"] = list(p.target_parameters)
    tokens = trainable_token_indices(model, new_ids, list(p.modules_to_save))
    if tokens:
        opts["trainable_token_indices"] = tokens
    return opts


def _keep_4bit_layout(model: Any) -> None:
    """Sharded QLoRA on CPU: bitsandbytes' CPU inference fast path (eval mode, AVX512-BF16) re-packs a
    Linear4bit's weight in place on its first forward and flags its quant_state for good. Under FSDP2 the
    weight is re-gathered from the unconverted shards on every forward, so later forwards would read the
    shards through the flag as the other layout (wrong eval losses), and ZeRO-3's save then fails on it.
    Keeping the standard layout costs nothing on GPUs, where that path does not exist."""
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, Linear4bit) and getattr(m, "support_avx512bf16_for_cpu", False):
            m.support_avx512bf16_for_cpu = False


def save_merged(adapter_dir: str, out_dir: str, dtype: torch.dtype) -> None:
    """Merge a LoRA adapter into a full-precision copy of its base (works for QLoRA too, and after
    ZeRO-3, because it starts from the saved adapter, not from the sharded training model)."""
    from peft import AutoPeftModelForCausalLM
    model = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, dtype=dtype)
    model.merge_and_unload().save_pretrained(out_dir)


def derives_packed_masks(model: Any) -> bool:
    """Whether transformers builds this model's packed masks itself: its masking_utils finds packed
    examples from restarting position ids (data.collate) -- but only where the architecture passes
    `position_ids` to the mask functions. Many do (Llama, Mistral, Qwen, Gemma, Mixtral, Qwen-MoE);
    some do not (gpt-oss, Bloom, ...), and remote code may not: those get explicit masks, or packed
    examples would silently attend to each other (tests/test_moe.py, tests/test_sliding_window.py)."""
    import inspect
    import re
    import sys
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    module = type(base).__module__
    if not module.startswith("transformers.models."):
        return False
    try:
        source = inspect.getsource(sys.modules[module])
    except (OSError, TypeError, KeyError):
        return False
    return bool(re.search(r'"position_ids":\s*position_ids|\w*mask\w*\((?:[^()]|\([^()]*\))*?position_ids=position_ids',
                          source, re.S))
