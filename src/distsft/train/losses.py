"""The training loss of one micro-batch from the fused head's per-token log-probabilities, and what the
logs need from it: the language-model loss sum (always NLL, so `loss` means the same under every
loss_type and matches `eval_loss`), per-source sums, and the router's load-balancing loss.

Loss types (TRL's names):
  * nll -- mean next-token negative log-likelihood over the global batch's labelled tokens.
  * dft -- Dynamic Fine-Tuning (Wu et al. 2025, arXiv 2508.05629; TRL `loss_type="dft"`): each token's
    NLL weighted by its own probability, detached, -p·log p. The weighting is per token, so the
    global-batch normalisation (divide by the global batch's labelled tokens) is the same as nll's.

The optimized loss is sum(token objective) / global labelled tokens × world size (DDP and DeepSpeed
average gradients over ranks; TRL's own scaling) plus the router term: coef × aux_loss / accumulation
steps, since the aux loss is a mean per micro-batch (TRL's convention).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

LOSS_TYPES = ("nll", "dft")


@dataclass
class MicroLoss:
    loss: torch.Tensor            # what backward() sees
    nll_sum: float                # sum of token NLLs (the logged `loss` numerator)
    tokens: int                   # labelled tokens of this micro-batch
    aux_loss: float | None        # unweighted load-balancing loss, when the model routes
    per_source: torch.Tensor | None  # [n_sources, 2] float64: (NLL sum, tokens) per source id


def token_objective(log_probs: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Per-token loss to minimise (zero where log_probs is zero, i.e. unlabelled)."""
    nll = -log_probs
    if loss_type == "dft":
        return nll * log_probs.exp().detach()
    if loss_type != "nll":
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return nll


def per_source_sums(log_probs: torch.Tensor, label_mask: torch.Tensor, source_ids: torch.Tensor,
                    n_sources: int) -> torch.Tensor:
    """[n_sources, 2] (NLL sum, labelled tokens) per source. `source_ids` is [B, L] over the input
    positions (-1 on padding); the log-probs are over the L-1 predicted positions, whose label is the
    next token -- a token belongs to the example its label belongs to."""
    ids = source_ids[..., 1:].to(log_probs.device)
    keep = label_mask & (ids >= 0)
    idx = ids[keep].long()
    nll = (-log_probs.detach()[keep]).double()
    sums = torch.zeros(n_sources, dtype=torch.float64, device=log_probs.device).index_add_(0, idx, nll)
    counts = torch.zeros(n_sources, dtype=torch.float64, device=log_probs.device).index_add_(
        0, idx, torch.ones_like(nll))
    return torch.stack([sums, counts], dim=1).cpu()


def micro_loss(outputs: Any, loss_type: str, num_items_in_batch: Any, scale: float,
               aux: torch.Tensor | None = None, aux_coef: float = 0.0, accum_steps: int = 1,
               source_ids: torch.Tensor | None = None, n_sources: int = 0) -> MicroLoss:
    """The loss of one micro-batch from the fused head's outputs (log_probs, label_mask).
    `scale`: the world size under average_tokens_across_devices (TRL's scaling), else 1."""
    log_probs, mask = outputs.log_probs, outputs.label_mask
    objective = token_objective(log_probs, loss_type)
    denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    loss = objective.sum() / torch.as_tensor(denom, device=objective.device).clamp(min=1) * scale
    if aux is not None and aux_coef:
        loss = loss + aux_coef * aux.to(loss.device) / max(1, accum_steps)
    per_source = (per_source_sums(log_probs, mask, source_ids, n_sources)
                  if source_ids is not None and n_sources else None)
    return MicroLoss(loss=loss, nll_sum=float(-log_probs.detach().sum()), tokens=int(mask.sum()),
                     aux_loss=None if aux is None else float(aux.detach()), per_source=per_source)
