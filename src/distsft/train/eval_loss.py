"""Summed token losses of one eval batch without materialising its full logits.

The model's forward returns logits for every position (batch × length × vocab; with a 128k vocabulary
at batch 4 × 4096 that is ~8 GB in bf16 and ~16 GB more once upcast to fp32 for the loss). Here the
decoder runs once, then only the positions that carry a label go through the output head, a chunk of
positions at a time, each chunk's logits upcast and reduced before the next: the transient is one
chunk's logits (`chunk_bytes`), whatever the batch, length or vocabulary.

Under ZeRO-3 every call of the head gathers its weight collectively, so all ranks make the same number
of calls (the largest count among them; a rank with fewer positions calls it on an empty chunk).
"""

from __future__ import annotations

from typing import Any

import torch

from distsft.runtime import dist

CHUNK_BYTES = 256 * 2**20


def _final_logits(model: Any, logits: torch.Tensor) -> torch.Tensor:
    """What the model's own forward does to the head's output (scaling, soft-capping), in fp32."""
    cfg = getattr(model, "config", None)
    logits = logits.float()
    scale = getattr(cfg, "logit_scale", None)  # Cohere
    if isinstance(scale, (int, float)) and scale != 1:
        logits = logits * scale
    scaling = getattr(cfg, "logits_scaling", None)  # Granite
    if isinstance(scaling, (int, float)) and scaling != 1:
        logits = logits / scaling
    cap = getattr(cfg, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _fsdp_root(model: Any) -> Any:
    """The model when it is an FSDP2 root (fully_shard), else None."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return None
    return model if isinstance(model, FSDPModule) else None


def token_loss_sum(model: Any, batch: dict[str, Any], labels: torch.Tensor,
                   chunk_bytes: int = CHUNK_BYTES, shifted: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of the next-token cross-entropy over positions whose label is not -100, their count).
    `shifted`: labels[i] is already position i's next token (a sequence-parallel shard, train.seqpar)."""
    # FSDP2 gathers the root's own parameters (embeddings, final norm, head: what no wrapped layer owns)
    # only in the root's forward, which calling the decoder and the head directly bypasses; the wrapped
    # decoder layers still gather theirs in their own hooks. Eval runs after a training step, so the
    # root has been initialised by its forward already.
    root = _fsdp_root(model)
    if root is not None:
        root.unshard()
    try:
        return _token_loss_sum(model, batch, labels, chunk_bytes, shifted)
    finally:
        if root is not None:
            root.reshard()


def _token_loss_sum(model: Any, batch: dict[str, Any], labels: torch.Tensor,
                    chunk_bytes: int, shifted: bool = False) -> tuple[torch.Tensor, int]:
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    hidden = decoder(**batch, use_cache=False)[0]
    labels = labels.to(hidden.device) if shifted else labels.to(hidden.device)[..., 1:]
    keep = labels != -100
    h = (hidden if shifted else hidden[..., :-1, :])[keep]
    y = labels[keep]
    # The config's vocabulary: under ZeRO-3 the head's weight is a partition (an empty shape) here.
    vocab = int(getattr(model.config, "vocab_size", 0) or head.weight.shape[0])
    per_chunk = max(1, chunk_bytes // (4 * max(1, vocab)))
    n_chunks = -(-h.shape[0] // per_chunk)
    if dist.env().world_size > 1:  # the same number of head calls on every rank (ZeRO-3 gathers)
        n_chunks = int(dist.all_reduce([float(n_chunks)], "max", device=hidden.device)[0])
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for i in range(max(1, n_chunks)):
        rows = slice(i * per_chunk, (i + 1) * per_chunk)
        logits = _final_logits(model, head(h[rows]))
        if logits.shape[0]:
            total = total + torch.nn.functional.cross_entropy(logits, y[rows], reduction="sum")
        del logits
    return total, int(y.numel())
