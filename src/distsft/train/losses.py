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
    """Every figure stays on the device (0-d or small tensors): reading one on the host would wait for
    the GPU once per micro-batch; they are summed there and read once per logging step (step_sync)."""
    loss: torch.Tensor            # what backward() sees
    nll_sum: torch.Tensor         # float64, sum of token NLLs (the logged `loss` numerator)
    tokens: torch.Tensor          # labelled tokens of this micro-batch
    aux_loss: torch.Tensor | None  # unweighted load-balancing loss, when the model routes
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
    # Weights, not boolean indexing (which reads the selected count on the host): a position that is
    # unlabelled or padding adds 0 to source 0.
    keep = (label_mask & (ids >= 0)).double().flatten()
    idx = ids.clamp(min=0).long().flatten()
    nll = -log_probs.detach().double().flatten() * keep
    sums = torch.zeros(n_sources, dtype=torch.float64, device=log_probs.device).index_add_(0, idx, nll)
    counts = torch.zeros(n_sources, dtype=torch.float64, device=log_probs.device).index_add_(0, idx, keep)
    return torch.stack([sums, counts], dim=1)


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
    return MicroLoss(loss=loss, nll_sum=-log_probs.detach().double().sum(), tokens=mask.sum(),
                     aux_loss=None if aux is None else aux.detach().double(), per_source=per_source)


class LossComputer:
    """The trainer's micro-batch loss (replacing TRL's compute_loss for training) and the per-step sums
    the logs need beyond the LM loss: aux_loss, loss_<label>, entropy and mean_token_accuracy, summed on
    the device and carried over the ranks by the step window's one collective per logging step (no
    collective or host read per micro-batch, unlike TRL's metrics)."""

    def __init__(self, model: Any, loss_type: str = "nll", aux_coef: float | None = None,
                 source_labels: list[str | None] | None = None):
        from distsft.config.moe import moe_of
        self.loss_type = loss_type
        self.moe = moe_of(model.config)
        self.aux_coef = (self.moe.router_aux_loss_coef if aux_coef is None else float(aux_coef)) if self.moe else 0.0
        # source index -> metric label; several sources may share a label
        self.labels = sorted({lab for lab in (source_labels or []) if lab})
        self.source_to_label = [self.labels.index(lab) if lab else -1 for lab in (source_labels or [])]
        self._n = len(self.labels)
        # aux sum, aux count, entropy, top1, per label: on the loss's device once the first micro-batch comes
        self._sums: torch.Tensor | None = None
        self._routers: list[Any] | None = None

    def __call__(self, trainer: Any, model: Any, inputs: dict[str, Any], num_items_in_batch: Any) -> MicroLoss:
        from distsft.train import moe as moe_lib
        source_ids = inputs.pop("source_ids", None)
        token_mask = inputs.pop("token_mask", None)
        inputs["use_cache"] = False
        if self.moe is not None:
            if self._routers is None:  # found once: walking every module per micro-batch adds up
                self._routers = [m for _, m in moe_lib.routers(trainer.accelerator.unwrap_model(model))]
            with moe_lib.router_logits(self._routers) as found:
                outputs = model(**inputs, fused_lm_head=True)
            aux = moe_lib.load_balancing_loss(found, self.moe, token_mask) if found else None
        else:
            outputs = model(**inputs, fused_lm_head=True)
            aux = None
        scale = trainer.accelerator.num_processes if (trainer.args.average_tokens_across_devices
                                                     and num_items_in_batch is not None) else 1
        steps = trainer.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        if source_ids is not None and self._n:
            lut = torch.tensor(self.source_to_label + [-1], dtype=torch.long, device=source_ids.device)
            source_ids = lut[source_ids.long().clamp(min=-1)]  # -1 (padding) indexes the last entry
        ml = micro_loss(outputs, self.loss_type, num_items_in_batch, scale, aux=aux, aux_coef=self.aux_coef,
                        accum_steps=steps, source_ids=source_ids, n_sources=self._n)
        mask = outputs.label_mask
        if self._sums is None:
            self._sums = torch.zeros(4 + 2 * self._n, dtype=torch.float64, device=ml.nll_sum.device)
        # Summed on the device (masked sums, no boolean indexing: that would read the count on the host).
        if ml.aux_loss is not None:
            self._sums[0] += ml.aux_loss.to(self._sums.device)
            self._sums[1] += 1.0
        if getattr(outputs, "entropy", None) is not None:
            self._sums[2] += (outputs.entropy.detach().double() * mask).sum()
        if getattr(outputs, "is_top1", None) is not None:
            self._sums[3] += (outputs.is_top1.double() * mask).sum()
        if ml.per_source is not None:
            self._sums[4:] += ml.per_source.flatten().to(self._sums.device)
        return ml

    def window_sums(self) -> torch.Tensor | None:
        """This rank's sums since the last call (a device vector for the step window's one collective,
        train.step_sync), and a fresh window; None before the first micro-batch."""
        if self._sums is None:
            return None
        out = self._sums.clone()
        self._sums.zero_()
        return out

    def metrics(self, s: list[float], loss_tokens: float, steps: int) -> dict[str, float]:
        """The window's metrics from `s`, window_sums() summed over all ranks (`loss_tokens` the window's
        labelled tokens, `steps` its optimizer steps). loss_tokens_<label> is per step, like loss_tokens."""
        out: dict[str, float] = {}
        if not s:
            return out
        if s[1]:
            out["aux_loss"] = s[0] / s[1]  # mean over micro-batches and ranks, as TRL logs it
        if loss_tokens:
            if s[2]:
                out["entropy"] = s[2] / loss_tokens
            out["mean_token_accuracy"] = s[3] / loss_tokens
        for i, label in enumerate(self.labels):
            total, count = s[4 + 2 * i], s[5 + 2 * i]
            if count:
                out[f"loss_{label}"] = total / count
                out[f"loss_tokens_{label}"] = count / max(1, steps)
        return out
