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


def sliding_window_of(config: Any) -> int | None:
    """The window when some layer of the model slides (and others may not), else None."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or []
    if not window or (types and "sliding_attention" not in types):
        return None
    if getattr(cfg, "use_sliding_window", True) is False:  # Qwen2/3 declare a window they do not use
        return None
    return int(window)


def with_layer_masks(batch: dict[str, Any], window: int | None) -> dict[str, Any]:
    """Replace a packed 4-D mask by {"full_attention": mask, "sliding_attention": windowed mask}."""
    mask = batch.get("attention_mask")
    if window is None or not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return batch
    pos = batch["position_ids"]  # restarts at 0 in every packed example (and on padding)
    L = pos.shape[-1]
    q = torch.arange(L)[:, None]
    k = torch.arange(L)[None, :]
    # Within one example position_ids and indices differ by a constant, so index distance is the
    # distance inside the example; the packed mask already blocks other examples.
    near = (q - k < window)[None, None]
    if mask.dtype == torch.bool:
        sliding = mask & near
    else:  # eager: additive float mask, 0 = attend
        sliding = mask.masked_fill(~near, torch.finfo(mask.dtype).min)
    return {**batch, "attention_mask": {"full_attention": mask, "sliding_attention": sliding}}
