"""`train.optim`: HF's optimizer names, checked where a user can still fix the spec.

The names are transformers' `OptimizerNames` (tests/test_options.py keeps this copy equal to the
installed enum); they are listed here so that validating a spec imports no ML library (the launcher's
warm path and `distsft plan` stay fast). The optimizer itself is built by HF's Trainer from
`TrainingArguments.optim`, so its state is saved in and restored from `optimizer.pt` like AdamW's.
"""

from __future__ import annotations

import importlib.util

OPTIMIZERS = (
    "adamw_torch", "adamw_torch_fused", "adamw_torch_xla", "adamw_torch_npu_fused", "adafactor",
    "adamw_anyprecision", "adamw_torch_4bit", "adamw_torch_8bit", "ademamix", "sgd", "adagrad",
    "adamw_bnb_8bit", "adamw_8bit", "ademamix_8bit", "lion_8bit", "lion_32bit", "paged_adamw_32bit",
    "paged_adamw_8bit", "paged_ademamix_32bit", "paged_ademamix_8bit", "paged_lion_32bit",
    "paged_lion_8bit", "rmsprop", "rmsprop_bnb", "rmsprop_bnb_8bit", "rmsprop_bnb_32bit", "galore_adamw",
    "galore_adamw_8bit", "galore_adafactor", "galore_adamw_layerwise", "galore_adamw_8bit_layerwise",
    "galore_adafactor_layerwise", "lomo", "adalomo", "grokadamw", "schedule_free_radam",
    "schedule_free_adamw", "schedule_free_sgd", "apollo_adamw", "apollo_adamw_layerwise", "stable_adamw",
)

# The package an optimizer family needs beyond torch/transformers (import name, pip name).
_NEEDS = (
    (("bnb", "8bit", "paged_", "lion_", "ademamix"), ("bitsandbytes", "bitsandbytes")),
    (("galore_",), ("galore_torch", "galore-torch")),
    (("apollo_",), ("apollo_torch", "apollo-torch")),
    (("lomo", "adalomo"), ("lomo_optim", "lomo-optim")),
    (("grokadamw",), ("grokadamw", "grokadamw")),
    (("schedule_free_",), ("schedulefree", "schedulefree")),
    (("adamw_torch_4bit", "adamw_torch_8bit"), ("torchao", "torchao")),
    (("adamw_anyprecision",), ("torchdistx", "torchdistx")),
    (("adamw_torch_xla",), ("torch_xla", "torch_xla")),
    (("adamw_torch_npu_fused",), ("torch_npu", "torch_npu")),
    (("stable_adamw",), ("optimi", "torch-optimi")),
)
# HF needs `optim_target_modules` for these, which the spec does not carry.
_NEEDS_TARGET_MODULES = ("galore_", "apollo_")


def validate_name(name: str) -> str:
    if name not in OPTIMIZERS:
        raise ValueError(f"train.optim: unknown optimizer {name!r}; valid names (transformers' "
                         f"OptimizerNames): {', '.join(OPTIMIZERS)}")
    if name.startswith(_NEEDS_TARGET_MODULES):
        raise ValueError(f"train.optim={name} needs HF's optim_target_modules, which distsft does not "
                         "set; choose another optimizer")
    return name


def required_package(name: str) -> tuple[str, str] | None:
    """(import name, pip name) of the extra package `name` needs, or None. The torchao 4/8-bit
    AdamW names contain "8bit" too, so the more specific rules are checked first."""
    for prefixes, pkg in reversed(_NEEDS):
        if any(p in name for p in prefixes):
            return pkg
    return None


def check_available(name: str) -> None:
    """Before any rank starts: an optimizer whose package is missing is a SpecError (exit 2), not a
    traceback from every rank after the model has loaded."""
    from distsft.errors import SpecError
    pkg = required_package(name)
    if pkg and importlib.util.find_spec(pkg[0]) is None:
        raise SpecError(f"train.optim={name} needs the {pkg[1]} package, which is not installed here "
                        f"(pip install {pkg[1]}), or choose another optimizer such as adamw_torch")
