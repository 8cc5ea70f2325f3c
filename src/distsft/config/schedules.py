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
    """The learning rate of each optimizer step 1..total_steps, as the scheduler training builds it sets
    it (HF logs `learning_rate` for step s before stepping the scheduler: the LR step s used)."""
    base = float(spec.train.learning_rate)
    kwargs = scheduler_kwargs(spec.train, total_steps)
    return [base * lr_factor(spec.train.lr_scheduler_type, s, warmup_steps, total_steps, kwargs, base)
            for s in range(total_steps)]


def lr_factor(name: str, step: int, warmup: int, total: int, kwargs: dict[str, Any] | None, base_lr: float) -> float:
    """The multiplier HF's scheduler `name` applies to the peak LR at `step`: transformers'
    optimization.py lambdas (5.x), in plain Python so that the plan's curve imports neither torch nor
    transformers (whose optimization module imports PEFT and bitsandbytes). A test holds every name
    equal to HF's get_scheduler."""
    kw = kwargs or {}
    if name == "constant":
        return 1.0
    if step < warmup and name != "warmup_stable_decay":
        return float(step) / float(max(1, warmup))
    progress = float(step - warmup) / float(max(1, total - warmup))
    if name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return max(0.0, float(total - step) / float(max(1, total - warmup)))
    if name == "cosine":
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    if name == "cosine_with_min_lr":
        rate = kw.get("min_lr_rate", 0.0)
        factor = 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress))
        return max(0.0, factor * (1 - rate) + rate)
    if name == "cosine_with_restarts":
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((1.0 * progress) % 1.0))))
    if name == "polynomial":
        lr_end, power = 1e-7, 1.0
        if step > total:
            return lr_end / base_lr
        remaining = 1 - (step - warmup) / (total - warmup)
        return ((base_lr - lr_end) * remaining ** power + lr_end) / base_lr
    if name == "inverse_sqrt":
        timescale = warmup or 10_000
        return 1.0 / math.sqrt((step + timescale - warmup) / timescale)
    if name == "warmup_stable_decay":
        ratio, decay = kw.get("min_lr_ratio", 0.0), kw["num_decay_steps"]
        stable = total - warmup - decay
        if step < warmup:
            return max(0.0, float(step) / float(max(1, warmup)) * (1.0 - ratio) + ratio)
        if step < warmup + stable:
            return 1.0
        if step < warmup + stable + decay:
            p = float(step - warmup - stable) / float(max(1, decay))
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * p)) * (1.0 - ratio) + ratio)
        return ratio
    raise ValueError(f"no LR curve for scheduler {name!r}")
