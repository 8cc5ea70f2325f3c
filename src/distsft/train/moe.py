"""Mixture-of-experts models on every rank: their routers, expert weights and MoE blocks, and what each
backend, LoRA and QLoRA need from them.

transformers 5 stores the routed experts of Qwen3-MoE, Mixtral and gpt-oss as fused 3-D
`nn.Parameter`s (`mlp.experts.gate_up_proj`, `down_proj`, [num_experts, out, in]) beside a top-k router
(`mlp.gate`, gpt-oss `mlp.router`). Three libraries treat them as something else:
  * bitsandbytes' 4-bit loading quantizes `nn.Linear` only, so the experts -- most of an MoE's bytes --
    stay in 16 bits; `quantize_experts` quantizes them with bitsandbytes' parametrization
    (`replace_parameter_4bit`), which dequantizes on access.
  * PEFT's `all-linear` wraps the router as if it were a projection; `lora_targets` leaves routers out,
    and expert weights are adapted only on request (`peft.target_parameters`).
  * DeepSpeed ZeRO-3 installs gather hooks on every submodule and prefetches by the order it traced;
    a block whose submodules run in a data-dependent order (per-expert modules) hangs or mis-prefetches
    unless it is a leaf (`set_z3_leaf_modules`): then its parameters are gathered once, on entry.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

from distsft.config.moe import MoE, is_expert_parameter, moe_of
from distsft.errors import SpecError


def moe_blocks(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of every sparse MoE block: the module that owns an `experts` child."""
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)]


def block_classes(model: Any) -> list[type]:
    seen: dict[str, type] = {}
    for _, m in moe_blocks(model):
        seen.setdefault(type(m).__name__, type(m))
    return list(seen.values())


def routers(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of each block's router: the block's other child whose weight is [num_experts, hidden]
    (`gate` in Qwen3-MoE and Mixtral, `router` in gpt-oss)."""
    out = []
    for name, block in moe_blocks(model):
        n_exp = _num_experts(block.experts)
        for child_name, child in block.named_children():
            w = getattr(child, "weight", None)
            shape = _shape(w) if isinstance(w, torch.Tensor) else ()
            if child_name != "experts" and len(shape) == 2 and (n_exp is None or shape[0] == n_exp):
                out.append((f"{name}.{child_name}" if name else child_name, child))
    return out


def _shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's real shape; ZeRO-3 partitions while loading (the local tensor is a flat shard)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _num_experts(experts: Any) -> int | None:
    n = getattr(experts, "num_experts", None)
    if isinstance(n, int):
        return n
    return len(experts) if isinstance(experts, torch.nn.ModuleList) else None


def expert_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if is_expert_parameter(n)]


def fused_expert_parameter_names(model: Any) -> list[str]:
    """Short names (`gate_up_proj`, `down_proj`, ...) of the experts' 3-D weight stacks: what PEFT's
    `target_parameters` takes for them."""
    names: list[str] = []
    for _, block in moe_blocks(model):
        for pname, p in block.experts.named_parameters(recurse=False):
            if len(_shape(p)) == 3 and pname not in names:
                names.append(pname)
    return names


def loaded_bytes(model: Any) -> dict[str, int]:
    """Bytes the loaded weights occupy, experts and the rest: quantized weights at their packed size plus
    their quantization constants (bitsandbytes keeps those in a QuantState beside the parameter)."""
    out = {"experts": 0, "other": 0}
    seen: set[int] = set()
    for n, p in model.named_parameters():
        # ZeRO-3 partitions while loading: ds_numel is the whole stack
        out["experts" if is_expert_parameter(n) else "other"] += int(getattr(p, "ds_numel", p.numel())) * p.element_size()
        out["experts" if is_expert_parameter(n) else "other"] += _quant_state_bytes(getattr(p, "quant_state", None), seen)
    for name, m in model.named_modules():
        for pname, plist in (getattr(m, "parametrizations", None) or {}).items():
            key = "experts" if is_expert_parameter(f"{name}.{pname}") else "other"
            for f in plist:
                out[key] += _quant_state_bytes(getattr(f, "quant_state", None), seen)
    return out


def _quant_state_bytes(qs: Any, seen: set[int]) -> int:
    if qs is None:
        return 0
    n = 0
    for attr in ("absmax", "code", "offset"):
        t = getattr(qs, attr, None)
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            n += t.numel() * t.element_size()
    return n + _quant_state_bytes(getattr(qs, "state2", None), seen)


# --------------------------------------------------------------------------- backends

def set_zero3_leaves(model: Any) -> list[str]:
    """Mark the MoE blocks as ZeRO-3 leaf modules (before deepspeed.initialize); returns their classes."""
    classes = block_classes(model)
    if classes:
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]


# --------------------------------------------------------------------------- QLoRA

def quantize_experts(model: Any, skip: list[str] = ()) -> int:
    """4-bit NF4 (double-quantized statistics, like the linear layers) for every 3-D expert stack not in
    `skip` (stacks adapted through PEFT's target_parameters stay in 16 bits: PEFT would not find a
    parametrized weight). Returns the bytes saved."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit
    before = loaded_bytes(model)["experts"]
    for _, block in moe_blocks(model):
        for pname, p in list(block.experts.named_parameters(recurse=False)):
            if p.dim() == 3 and pname not in skip:
                replace_parameter_4bit(block.experts, pname, compress_statistics=True, quant_type="nf4")
    return before - loaded_bytes(model)["experts"]


def expert_cost_note(model: Any, why: str) -> str:
    """The loud message for experts that stay in 16 bits under QLoRA, with what it costs."""
    b = loaded_bytes(model)
    share = b["experts"] / max(1, b["experts"] + b["other"])
    # NF4 with double quantization: ~0.53 bytes per weight instead of 2.
    saved = b["experts"] - b["experts"] * 0.53 / 2
    return (f"QLoRA: the routed experts stay in 16 bits ({why}): {b['experts'] / 2**30:.3g} GiB, "
            f"{share:.0%} of the loaded weights; quantized they would take ~{saved / 2**30:.3g} GiB less per copy")


# --------------------------------------------------------------------------- LoRA targets

def lora_targets(model: Any, target_modules: list[str] | str) -> list[str] | str:
    """PEFT's target_modules. For an MoE, `all-linear` becomes the explicit list of nn.Linear modules
    but the output head -- without the routers. PEFT 0.21 resolves `all-linear` on Mixtral and
    Qwen2/3-MoE through its v4 -> v5 name conversion, which adapts the routers (`gate.weight`) and the
    fused experts too, while on gpt-oss it adapts neither: one rule for all families instead. A router's
    LoRA moves tokens between experts, which is not what "all linear layers" means to a user; routers
    named explicitly in target_modules, and experts named in target_parameters, are adapted."""
    names = {n for n, _ in routers(model)}
    if not names or target_modules != "all-linear":
        return target_modules
    head = model.get_output_embeddings()
    return sorted(n for n, m in model.named_modules()
                  if isinstance(m, torch.nn.Linear) and m is not head and n not in names)


def check_target_parameters(model: Any, targets: list[str]) -> None:
    """PEFT silently adapts nothing for a `target_parameters` entry that matches no parameter; distsft
    refuses (exit 2), listing what the model has."""
    names = [n for n, _ in model.named_parameters()]
    for t in targets:
        if not any(n == t or n.endswith("." + t) for n in names):
            fused = fused_expert_parameter_names(model)
            hint = (f"its expert weights are {', '.join('experts.' + f for f in fused)}" if fused
                    else "it has no fused expert weights")
            raise SpecError(f"peft.target_parameters: {t!r} matches no parameter of {type(model).__name__} ({hint})")


# --------------------------------------------------------------------------- the router loss

@contextlib.contextmanager
def router_logits(model_or_routers: Any) -> Iterator[list[torch.Tensor]]:
    """Collect every router's logits (its output [0], as transformers' OutputRecorder does) during
    forwards inside the block, in call order. Takes the model or its router modules."""
    found: list[torch.Tensor] = []
    mods = model_or_routers if isinstance(model_or_routers, list) else [m for _, m in routers(model_or_routers)]
    hooks = [m.register_forward_hook(lambda _m, _i, out: found.append(out[0] if isinstance(out, tuple) else out))
             for m in mods]
    try:
        yield found
    finally:
        for h in hooks:
            h.remove()


def load_balancing_loss(logits: list[torch.Tensor], moe: MoE, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Switch-Transformer load-balancing loss over real tokens (transformers' own function, given a
    [batch, length] mask: the model's forward would pass its 4-D packed attention mask, which that
    function cannot read)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    mask = None if token_mask is None else token_mask.reshape(1, -1)
    return load_balancing_loss_func(tuple(logits), moe.num_experts, moe.top_k, mask)


def moe_or_error(model: Any, key: str) -> MoE:
    """The model's MoE layout, or exit 2 naming `key` (an MoE option on a dense model)."""
    moe = moe_of(model.config)
    if moe is None or not routers(model):
        raise SpecError(f"{key}: {type(model).__name__} is not a mixture-of-experts model (no experts and "
                        "router found); remove the option")
    return moe


def load_attention(load: Any, attn: str, requested: str) -> Any:
    """Load with `attn`; when `auto` chose sdpa for a model without an sdpa path (gpt-oss: its attention
    sinks are a softmax term sdpa has no input for), load with eager instead. `load(attn)` loads.
    The collator must then build the eager (additive float) mask: read the model's choice back with
    `attention_of(model)`."""
    try:
        return load(attn)
    except ValueError as exc:
        if requested != "auto" or attn != "sdpa" or "does not support an attention implementation" not in str(exc):
            raise
    return load("eager")


def attention_of(model: Any, default: str) -> str:
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return impl if isinstance(impl, str) and impl else default


def checkpoint_quantization(config: Any, method: str) -> tuple[dict[str, Any], str | None]:
    """from_pretrained kwargs for a checkpoint stored quantized, and the note to print. gpt-oss ships its
    experts in MXFP4, which no kernel distsft uses can train (transformers marks the MXFP4 quantizer
    not trainable): the experts are dequantized while loading -- on a GPU with triton and `kernels`
    transformers would otherwise keep them packed. QLoRA cannot start from it: transformers refuses a
    BitsAndBytesConfig for a checkpoint quantized another way."""
    qc = getattr(config, "quantization_config", None)
    method_name = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(method_name).lower().removeprefix("quantizationmethod.") != "mxfp4":
        return {}, None
    if method == "qlora":
        raise SpecError("peft.method=qlora: the checkpoint's experts are stored in MXFP4 (gpt-oss), which "
                        "transformers cannot re-quantize with bitsandbytes; use peft.method: lora (the experts "
                        "are dequantized to 16 bits) or a 16-bit copy of the weights")
    from transformers import Mxfp4Config
    return ({"quantization_config": Mxfp4Config(dequantize=True)},
            "MXFP4 experts dequantized while loading (MXFP4 weights cannot be trained): they take 4x their "
            "checkpoint bytes in 16 bits (8x in fp32)")


def prepare(spec: Any, model: Any, sharded: bool, say: Any) -> None:
    """After from_pretrained, before PEFT: refuse MoE options on a dense model and target_parameters
    that match nothing (exit 2, naming the key), quantize the experts under QLoRA (or say loudly what
    16-bit experts cost), and make the MoE blocks ZeRO-3 leaves."""
    if spec.train.router_aux_loss_coef is not None:
        moe_or_error(model, "train.router_aux_loss_coef")
    targets = list(spec.peft.target_parameters)
    if targets:
        check_target_parameters(model, targets)
    layout = moe_of(model.config)
    if layout is None or not moe_blocks(model):
        return
    if spec.peft.method == "qlora":
        adapted = [t.rsplit(".", 1)[-1] for t in targets]
        if sharded:
            say(expert_cost_note(model, "sharded QLoRA: FSDP2 / ZeRO-3 shard the weights as loaded, and "
                                        "bitsandbytes cannot quantize a sharded stack"))
        else:
            saved = quantize_experts(model, skip=adapted)
            say(f"QLoRA: routed experts quantized to 4 bits (NF4), {saved / 2**30:.3g} GiB saved")
            if adapted:
                say(expert_cost_note(model, f"adapted through peft.target_parameters ({', '.join(targets)}); "
                                            "PEFT upcasts them to fp32 beside the 4-bit weights"))
    if spec.distributed.backend == "deepspeed" and spec.distributed.stage == 3:
        say(f"deepspeed: ZeRO-3 leaf modules {', '.join(set_zero3_leaves(model))} (MoE blocks: gathered once per forward)")


def preflight(spec: Any) -> None:
    """The MoE-option checks before any rank starts (train.preflight), from the model's config on the
    meta device; only when such an option is set (it imports transformers). A model not readable here
    (a hub id not downloaded yet) is checked by the ranks after loading (`prepare`)."""
    coef = spec.train.router_aux_loss_coef is not None
    targets = list(spec.peft.target_parameters) if spec.peft.method != "none" else []
    if not (coef or targets):
        return
    try:
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        config = AutoConfig.from_pretrained(spec.model.name_or_path, trust_remote_code=spec.model.trust_remote_code,
                                            local_files_only=True)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - unreadable here: the ranks check after loading
        return
    if coef:
        moe_or_error(model, "train.router_aux_loss_coef")
    if targets:
        check_target_parameters(model, targets)


def reload_checkpoint_weights(model: Any, checkpoint_dir: str) -> bool:
    """Resume (DDP / ZeRO-1/2 full fine-tuning): HF Trainer loads a checkpoint's model.safetensors with
    `load_state_dict(strict=False)`, but transformers 5 saves MoE checkpoints in the original per-expert
    layout (`experts.0.gate_proj.weight`, ...), which matches none of the fused stacks: the experts would
    silently keep their initial weights while the optimizer resumes. Here the checkpoint is read through
    from_pretrained (which converts the layout) and copied in strictly. Returns whether it did so (False:
    not an MoE, or the keys already match; HF's own loading is right then)."""
    import json
    from pathlib import Path
    d = Path(checkpoint_dir)
    if not moe_blocks(model):
        return False
    if (d / "model.safetensors").is_file():
        from safetensors import safe_open
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
    elif (d / "model.safetensors.index.json").is_file():
        keys = set(json.loads((d / "model.safetensors.index.json").read_text())["weight_map"])
    else:
        return False
    if keys == set(model.state_dict()):
        return False
    dtype = next(model.parameters()).dtype
    saved = type(model).from_pretrained(str(d), dtype=dtype, attn_implementation="eager")
    model.load_state_dict(saved.state_dict(), strict=True)
    del saved
    return True
