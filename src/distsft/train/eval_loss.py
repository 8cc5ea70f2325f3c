"""Summed token losses of one eval batch, computed by the forward training uses.

TRL's SFTTrainer gives the model a fused LM head (trl.trainer.utils.add_fused_lm_head): called with
`fused_lm_head=True` and the labels, the model's forward runs the decoder and projects only the labelled
positions through the head, in tiles, returning each token's log-probability -- the full
batch × length × vocabulary logits never exist. Evaluating through that same call (instead of calling
the decoder and the head directly, as distsft did before issue 19) gives, by construction:

  * the training loss's numerics: the head's output multiplier (`logit_scale`, `output_multiplier`,
    `lm_head_multiplier`, `logits_scaling`) and soft-capping exactly as TRL applies them in training;
  * the model's forward wrappers: accelerate's autocast (fp32 master weights reach flash-attn as bf16,
    which otherwise refuses fp32 q/k/v), FSDP2's root hooks (the root's embeddings, norm and head are
    gathered), DeepSpeed ZeRO-3's hooks, and the head gathered once per batch (trl's
    maybe_gather_lm_head_ctx), not once per chunk;
  * the transient of one tile of logits (TRL's 4096 tokens × 32768 vocabulary entries), whatever the
    batch, length or vocabulary.
"""

from __future__ import annotations

from typing import Any

import torch


def token_loss_sum(model: Any, batch: dict[str, Any], labels: torch.Tensor,
                   shifted: bool = False) -> tuple[torch.Tensor, int]:
    """(sum of the next-token cross-entropy over positions whose label is not -100, their count).
    `model` carries TRL's fused LM head (every model SFTTrainer trains does). The sum stays on the
    device; the count comes from `labels` as given (on the host: no device sync). `shifted`: labels[i]
    is already position i's next token (a sequence-parallel shard, train.seqpar), which TRL's head takes
    as `shift_labels`."""
    kwargs = dict(batch, fused_lm_head=True)
    kwargs["shift_labels" if shifted else "labels"] = labels
    kwargs.setdefault("use_cache", False)
    out = model(**kwargs)
    # log_probs is zero at ignored positions.
    return -out.log_probs.float().sum(), int(((labels if shifted else labels[..., 1:]) != -100).sum())
