"""A LoRA adapter merged into its base a weight at a time: W' = W + scale * B @ A.

For QLoRA the base the adapter trained against is not the base on disk but its NF4 round trip (the
4-bit weights the forward dequantized at every step), so each weight that training quantized is
quantized and dequantized the same way first (bitsandbytes, the same block size, double quantization
and storage as train/model.py's BitsAndBytesConfig), then merged in the export dtype: the export is
the model that trained, not a slightly different one (LLaMA-Factory #3573 merged onto the original
weights).

What a streaming merge cannot express (DoRA's magnitude vectors, modules_to_save copies, trainable
token rows, LoRA on embeddings) goes through PEFT's own merge_and_unload in memory instead
(`needs_peft_merge`); the export is then verified the same way.
"""

from __future__ import annotations

import math
import re
from typing import Any

_A = re.compile(r"^base_model\.model\.(.+)\.lora_A\.weight$")
QLORA_BLOCKSIZE = 64  # bitsandbytes Linear4bit's default block size, what load_in_4bit uses


def needs_peft_merge(adapter_names: list[str], config: dict[str, Any]) -> str | None:
    """Why this adapter must be merged by PEFT in memory, or None when it streams."""
    if config.get("use_dora"):
        return "DoRA"
    if config.get("modules_to_save"):
        return "modules_to_save"
    if config.get("trainable_token_indices"):
        return "trainable token rows"
    if any("lora_embedding" in n or "magnitude" in n for n in adapter_names):
        return "LoRA on embeddings"
    if config.get("fan_in_fan_out"):
        return "fan_in_fan_out layers"
    return None


def _alpha(module: str, config: dict[str, Any]) -> float:
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config.get("lora_alpha", 8))


def deltas_for(adapter: dict[str, Any], config: dict[str, Any]) -> dict[str, tuple[Any, Any, float]]:
    """{base weight name: (A, B, scale)} for every adapted Linear (rank from A's shape, so rank_pattern
    needs no parsing)."""
    out = {}
    for name, a in adapter.items():
        m = _A.match(name)
        if not m:
            continue
        module = m.group(1)
        b = adapter[f"base_model.model.{module}.lora_B.weight"]
        r = a.shape[0]
        alpha = _alpha(module, config)
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        out[f"{module}.weight"] = (a, b, scale)
    return out


def nf4_round_trip(weight: Any) -> Any:
    """The weight as QLoRA's forward saw it: bf16, NF4-quantized with double-quantized absmax, dequantized."""
    import torch
    import bitsandbytes.functional as bnbf
    w = weight.to(torch.bfloat16)
    packed, state = bnbf.quantize_4bit(w, blocksize=QLORA_BLOCKSIZE, compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).to(torch.bfloat16)


def quantized_linears(config_dir: Any) -> set[str]:
    """Weight names of the Linear layers load_in_4bit quantizes: every nn.Linear but the output
    embedding (transformers keeps lm_head in full precision), found on the meta device."""
    import torch.nn as nn
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(config_dir)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    head = model.get_output_embeddings()
    return {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


class MergedWeights:
    """Produces each base tensor merged with its LoRA delta, in the export dtype."""

    def __init__(self, base: Any, adapter: dict[str, Any], config: dict[str, Any], dtype: Any,
                 quantized: set[str] | None = None):
        self.base, self.dtype = base, dtype
        self.deltas = deltas_for(adapter, config)
        self.quantized = quantized or set()
        missing = sorted(set(self.deltas) - set(base.names()))
        if missing:
            raise ValueError(f"the adapter adapts weights its base does not have: {', '.join(missing[:3])}")

    def entries(self) -> list[tuple[str, tuple[int, ...], Any]]:
        out = []
        for name, (shape, dtype) in self.base.names().items():
            out.append((name, shape, self.dtype if dtype.is_floating_point else dtype))
        return out

    def __call__(self, name: str) -> Any:
        import torch
        w = self.base.read([name])[name]
        if not w.dtype.is_floating_point:
            return w
        if name in self.quantized:
            w = nf4_round_trip(w)
        if name in self.deltas:
            a, b, scale = self.deltas[name]
            # In fp32, as PEFT's merge computes the delta, then once into the export dtype.
            w = w.to(torch.float32) + (b.to(torch.float32) @ a.to(torch.float32)) * scale
        return w.to(self.dtype)


def peft_merged_state(base_dir: Any, adapter_dir: Any, dtype: Any) -> dict[str, Any]:
    """PEFT's own merge, in memory (the cases MergedWeights does not stream)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    return {k: v.detach().to(dtype) if v.is_floating_point() else v.detach() for k, v in merged.state_dict().items()}
