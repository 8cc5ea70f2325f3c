"""The recommended SFT hyperparameters by model size and method: the one table `distsft init` picks from
and `distsft plan` warns against (never refuses for).

The ranges are the ones users start from (effective batch = micro x accumulation x data-parallel GPUs):

|                      | 1B-3B        | 7B-13B       | 30B-70B      |
|----------------------|--------------|--------------|--------------|
| learning rate (full) | 5e-5 - 1e-4  | 1e-5 - 5e-5  | 5e-6 - 2e-5  |
| effective batch      | 16 - 32      | 32 - 64      | 64 - 128     |
| epochs               | 3 - 5        | 2 - 3        | 1 - 2        |
| warmup ratio         | 0.05 - 0.1   | 0.03 - 0.1   | 0.03 - 0.05  |
| weight decay         | 0.01 - 0.1   | 0.01         | 0.01         |
| max grad norm        | 1.0          | 1.0          | 1.0          |

LoRA and QLoRA: learning rate 1e-4 - 2e-4, r 16, lora_alpha 32; the other rows as for full fine-tuning.
The size classes are cut halfway (geometrically) between the table's columns, so every model falls in
one: below 5B parameters "1B-3B", below 20B "7B-13B", from 20B "30B-70B". Sizes are total parameters
(an MoE model's experts all hold memory and all get trained).

Pure: no torch, no I/O. `pick` is what init writes; `warnings` is what plan prints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SMALL_BELOW = 5e9
MEDIUM_BELOW = 20e9
LORA_LR = (1e-4, 2e-4)
LORA_R, LORA_ALPHA = 16, 32
MAX_GRAD_NORM = 1.0
SCHEDULER = "cosine"
# Schedulers that are cosine decays in the table's sense (distsft's names, config.schedules).
COSINE_LIKE = ("cosine", "cosine_with_min_lr", "cosine_with_restarts")


@dataclass(frozen=True)
class SizeClass:
    label: str                       # the table's column
    learning_rate: tuple[float, float]  # full fine-tuning
    effective_batch: tuple[int, int]
    epochs: tuple[float, float]
    warmup_ratio: tuple[float, float]
    weight_decay: tuple[float, float]


CLASSES = (
    SizeClass("1B-3B", (5e-5, 1e-4), (16, 32), (3, 5), (0.05, 0.1), (0.01, 0.1)),
    SizeClass("7B-13B", (1e-5, 5e-5), (32, 64), (2, 3), (0.03, 0.1), (0.01, 0.01)),
    SizeClass("30B-70B", (5e-6, 2e-5), (64, 128), (1, 2), (0.03, 0.05), (0.01, 0.01)),
)


def size(num_parameters: int) -> str:
    """7615616512 -> '7.6B'; 134515008 -> '135M'; 139584 -> '140K'."""
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if num_parameters >= div:
            v = num_parameters / div
            return f"{v:.1f}{unit}" if unit == "B" else f"{v:.0f}{unit}"
    return str(num_parameters)


def size_class(num_parameters: int) -> SizeClass:
    if num_parameters < SMALL_BELOW:
        return CLASSES[0]
    return CLASSES[1] if num_parameters < MEDIUM_BELOW else CLASSES[2]


def learning_rate_range(num_parameters: int, method: str) -> tuple[float, float]:
    return LORA_LR if method in ("lora", "qlora") else size_class(num_parameters).learning_rate


@dataclass(frozen=True)
class Pick:
    """The values init writes, each with the one-line reason it writes beside it."""
    learning_rate: float
    effective_batch: int
    epochs: float
    warmup_ratio: float
    weight_decay: float
    max_grad_norm: float
    lr_scheduler_type: str
    lora_r: int | None
    lora_alpha: int | None
    why: dict[str, str]


def _geo_mid(lo: float, hi: float) -> float:
    """The geometric middle of a range, rounded to one significant digit (5e-5..1e-4 -> 7e-5)."""
    mid = math.sqrt(lo * hi)
    digits = -int(math.floor(math.log10(mid)))
    return round(mid, digits)


def effective_batch(lo: int, hi: int, unit: int) -> int:
    """The largest global batch in [lo, hi] that `unit` (micro-batch x data-parallel GPUs) divides; when
    none does (many GPUs), the smallest multiple of `unit` at or above lo."""
    best = (hi // unit) * unit
    return best if best >= lo else max(unit, -(-lo // unit) * unit)


def pick(num_parameters: int, method: str, dp_world: int = 1, micro: int = 1) -> Pick:
    c = size_class(num_parameters)
    lora = method in ("lora", "qlora")
    size_note = f"{size(num_parameters)} parameters: the table's {c.label} column"
    lo, hi = learning_rate_range(num_parameters, method)
    lr = _geo_mid(lo, hi)
    batch = effective_batch(*c.effective_batch, micro * dp_world)
    in_range = c.effective_batch[0] <= batch <= c.effective_batch[1]
    why = {
        "learning_rate": (f"{'LoRA/QLoRA' if lora else 'full fine-tuning'} range {lo:g}-{hi:g}"
                          + ("" if lora else f" for {c.label}") + f" ({size_note})"),
        "global_batch_size": (f"effective batch {c.effective_batch[0]}-{c.effective_batch[1]} for {c.label}"
                              if in_range else
                              f"the smallest multiple of micro x GPUs ({micro * dp_world}) at or above "
                              f"{c.effective_batch[0]}, the table's {c.label} minimum"),
        "num_train_epochs": f"{c.epochs[0]:g}-{c.epochs[1]:g} epochs for {c.label}",
        "warmup_ratio": f"{c.warmup_ratio[0]:g}-{c.warmup_ratio[1]:g} for {c.label}",
        "weight_decay": (f"{c.weight_decay[0]:g}-{c.weight_decay[1]:g}" if c.weight_decay[0] != c.weight_decay[1]
                         else f"{c.weight_decay[0]:g}") + f" for {c.label}",
        "max_grad_norm": "1.0: the usual SFT clipping",
        "lr_scheduler_type": "cosine decay after warmup: the usual SFT schedule",
    }
    if lora:
        why["r"] = f"r {LORA_R}, alpha {LORA_ALPHA}: the common LoRA/QLoRA starting point"
    return Pick(learning_rate=lr, effective_batch=batch, epochs=c.epochs[0], warmup_ratio=c.warmup_ratio[0],
                weight_decay=c.weight_decay[0], max_grad_norm=MAX_GRAD_NORM, lr_scheduler_type=SCHEDULER,
                lora_r=LORA_R if lora else None, lora_alpha=LORA_ALPHA if lora else None, why=why)


def _outside(value: float, lo: float, hi: float) -> bool:
    # A hair of tolerance so that 2e-5 typed as 0.00002 or a derived 0.0999... still counts as inside.
    return value < lo * (1 - 1e-9) or value > hi * (1 + 1e-9)


def _fmt(lo: float, hi: float) -> str:
    return f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}"


def warnings(spec: Any, num_parameters: int | None, global_batch: int) -> list[str]:
    """Hints, never failures: each hyperparameter outside the table's range for this model's size and
    method, naming the range. Without a parameter count (the model's config is not readable here) only
    the method's learning-rate bounds that hold for every size are checked."""
    t, w = spec.train, []
    method = spec.peft.method
    lora = method in ("lora", "qlora")
    lr = float(t.learning_rate or 0.0)
    if num_parameters is None:
        lo, hi = LORA_LR if lora else (CLASSES[2].learning_rate[0], CLASSES[0].learning_rate[1])
        if lr and _outside(lr, lo, hi):
            w.append(f"train.learning_rate={lr:g} is outside the recommended {_fmt(lo, hi)} for "
                     f"{'LoRA/QLoRA' if lora else 'full fine-tuning'} at any model size")
        return w
    c = size_class(num_parameters)
    who = f"{'LoRA/QLoRA' if lora else 'full fine-tuning'} of a {size(num_parameters)} model ({c.label})"
    lo, hi = learning_rate_range(num_parameters, method)
    if lr and _outside(lr, lo, hi):
        w.append(f"train.learning_rate={lr:g} is outside the recommended {_fmt(lo, hi)} for {who}")
    lo_b, hi_b = c.effective_batch
    if not lo_b <= global_batch <= hi_b:
        w.append(f"effective batch {global_batch} (global_batch_size) is outside the recommended "
                 f"{_fmt(lo_b, hi_b)} for {who}")
    if t.max_steps <= 0 and _outside(t.num_train_epochs, *c.epochs):
        w.append(f"train.num_train_epochs={t.num_train_epochs:g} is outside the recommended "
                 f"{_fmt(*c.epochs)} for {who}")
    if _outside(t.warmup_ratio, *c.warmup_ratio):
        w.append(f"train.warmup_ratio={t.warmup_ratio:g} is outside the recommended {_fmt(*c.warmup_ratio)} "
                 f"for {who}")
    if _outside(t.weight_decay, *c.weight_decay):
        w.append(f"train.weight_decay={t.weight_decay:g} is outside the recommended {_fmt(*c.weight_decay)} "
                 f"for {who}")
    if t.max_grad_norm and _outside(t.max_grad_norm, MAX_GRAD_NORM, MAX_GRAD_NORM):
        w.append(f"train.max_grad_norm={t.max_grad_norm:g}: the recommended clipping is {MAX_GRAD_NORM:g}")
    if t.lr_scheduler_type not in COSINE_LIKE and t.lr_scheduler_type != "warmup_stable_decay":
        w.append(f"train.lr_scheduler_type={t.lr_scheduler_type}: the recommended schedule is cosine")
    return w
