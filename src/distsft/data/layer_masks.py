"""Packed 4-D attention masks for models that mix sliding-window and full attention layers (gpt-oss,
Gemma 2/3, Mistral with `sliding_window`, Qwen2/3 with `use_sliding_window`).

transformers 5 uses a custom 4-D `attention_mask` as-is in every layer, so the packed collator's
block-diagonal causal mask would let a sliding layer see its whole example -- a packed example's logits
would differ from its logits alone (verified on a tiny gpt-oss: 27% of logits off by up to 0.12). Such
models accept a mapping {layer type: mask} instead (their forward skips building masks when given a
dict); the sliding entry is the packed mask further limited to the last `sliding_window` positions
of the same example (transformers' `sliding_window_overlay`: kv > q - window).

Flash-attention batches carry no mask (cu_seq_lens): the kernel applies the window within each example.
"""

from __future__ import annotations

from typing import Any

import torch


def sliding_window_of(config: Any) -> tuple[int, bool] | None:
    """(window, mixed) when some layer of the model slides -- mixed: other layers attend in full, and
    the model takes a mask per layer type -- else None."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    types = list(getattr(cfg, "layer_types", None) or [])
    if not window or (types and "sliding_attention" not in types):
        return None
    if getattr(cfg, "use_sliding_window", True) is False:  # Qwen2/3 declare a window they do not use
        return None
    return int(window), any(t != "sliding_attention" for t in types)


def with_layer_masks(batch: dict[str, Any], sliding: tuple[int, bool] | None) -> dict[str, Any]:
    """Limit a packed 4-D mask to the sliding window: a mapping {"full_attention": mask,
    "sliding_attention": windowed} for models mixing both, the windowed mask alone when every layer
    slides (Mistral: its forward takes one mask)."""
    mask = batch.get("attention_mask")
    if sliding is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return batch
    window, mixed = sliding
    pos = batch["position_ids"]  # restarts at 0 in every packed example (and on padding)
    L = pos.shape[-1]
    q = torch.arange(L)[:, None]
    k = torch.arange(L)[None, :]
    # Within one example position_ids and indices differ by a constant, so index distance is the
    # distance inside the example; the packed mask already blocks other examples.
    near = (q - k < window)[None, None]
    if mask.dtype == torch.bool:
        windowed = mask & near
    else:  # eager: additive float mask, 0 = attend
        windowed = mask.masked_fill(~near, torch.finfo(mask.dtype).min)
    return {**batch, "attention_mask": {"full_attention": mask, "sliding_attention": windowed} if mixed else windowed}
