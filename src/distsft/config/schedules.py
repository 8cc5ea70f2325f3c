"""Learning-rate schedules: the HF scheduler name and the `lr_scheduler_kwargs` distsft derives from the
spec, shared by training (train/recipe.py), the plan's LR curve and `lr_schedule.png`, so all three are the
same function of the step.

  cosine_with_min_lr   cosine from the peak down to `train.min_lr_ratio` × peak (default 0.1)
  warmup_stable_decay  warmup, constant peak, then a cosine decay over the last `train.decay_ratio`
                       of the steps (default 0.1) to `min_lr_ratio` × peak (default 0)
"""

from __future__ import annotations

import math
from typing import Any

# HF scheduler names distsft accepts; each needs at most what the spec carries.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
              "constant_with_warmup", "inverse_sqrt", "cosine_with_min_lr", "warmup_stable_decay")
MIN_LR_SCHEDULERS = ("cosine_with_min_lr", "warmup_stable_decay")
DEFAULT_MIN_LR_RATIO = {"cosine_with_min_lr": 0.1, "warmup_stable_decay": 0.0}
DEFAULT_DECAY_RATIO = 0.1


def decay_steps(total_steps: int, decay_ratio: float) -> int:
    return math.ceil(total_steps * decay_ratio)


def scheduler_kwargs(train: Any, total_steps: int) -> dict[str, Any] | None:
    """`lr_scheduler_kwargs` for HF's get_scheduler (transformers/optimization.py's argument names)."""
    name = train.lr_scheduler_type
    if name == "cosine_with_min_lr":
        ratio = DEFAULT_MIN_LR_RATIO[name] if train.min_lr_ratio is None else train.min_lr_ratio
        return {"min_lr_rate": float(ratio)}
    if name == "warmup_stable_decay":
        ratio = DEFAULT_MIN_LR_RATIO[name] if train.min_lr_ratio is None else train.min_lr_ratio
        decay = DEFAULT_DECAY_RATIO if train.decay_ratio is None else train.decay_ratio
        return {"num_decay_steps": decay_steps(total_steps, decay), "min_lr_ratio": float(ratio),
                "decay_type": "cosine"}
    return None


def final_lr_note(train: Any) -> str:
    """", min 0.1 × peak" for the schedules that end at a floor (plot titles)."""
    name = train.lr_scheduler_type
    if name not in MIN_LR_SCHEDULERS:
        return ""
    ratio = DEFAULT_MIN_LR_RATIO[name] if train.min_lr_ratio is None else train.min_lr_ratio
    return f", min {ratio:g} × peak"


def lr_curve(spec: Any, total_steps: int, warmup_steps: int) -> list[float]:
    """The learning rate of each optimizer step 1..total_steps, from the scheduler training builds
    (HF logs `learning_rate` for step s before stepping the scheduler: the LR step s used)."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    base = float(spec.train.learning_rate)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = get_scheduler(spec.train.lr_scheduler_type, opt, num_warmup_steps=warmup_steps,
                          num_training_steps=total_steps,
                          scheduler_specific_kwargs=scheduler_kwargs(spec.train, total_steps))
    assert isinstance(sched, LambdaLR), "schedules.SCHEDULERS holds LambdaLR schedules only"
    # What LambdaLR.step() sets before step s + 1, without stepping an optimizer 100k times.
    return [base * sched.lr_lambdas[0](s) for s in range(total_steps)]
