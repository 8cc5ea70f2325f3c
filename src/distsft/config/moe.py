"""What a model's config says about its experts: whether it is a mixture of experts, how many experts
it has and how many each token uses. Pure (no torch): `plan` reads it from a config, the ranks and the
MFU meter from the loaded model's config; the one copy of the "active parameters" rule lives here.

Config names across families (transformers 5.x): `num_experts` (Qwen2/3-MoE, OLMoE, GLM-4-MoE),
`num_local_experts` (Mixtral, gpt-oss, Jamba); `num_experts_per_tok` everywhere, `experts_per_token`
in older gpt-oss configs. A model whose config declares `output_router_logits` returns its router
logits on request, which is what the load-balancing loss is computed from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOP_K = ("num_experts_per_tok", "experts_per_token", "moe_topk", "top_k")


@dataclass(frozen=True)
class MoE:
    num_experts: int
    top_k: int
    router_aux_loss_coef: float  # the config's own coefficient (0.0 when it declares none)
    returns_router_logits: bool  # `output_router_logits` is a config field: the aux loss can be computed

    @property
    def active_fraction(self) -> float:
        """Share of the expert weights one token runs through."""
        return self.top_k / self.num_experts


def text_config(config: Any) -> Any:
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def moe_of(config: Any) -> MoE | None:
    """The expert layout of a model config (a transformers PretrainedConfig or a dict), or None for a
    dense model."""
    cfg = text_config(config)
    get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
    experts = next((get(k) for k in _EXPERTS if isinstance(get(k), int) and get(k) > 1), None)
    top_k = next((get(k) for k in _TOP_K if isinstance(get(k), int) and get(k) >= 1), None)
    if not experts or not top_k:
        return None
    has_logits = ("output_router_logits" in cfg) if isinstance(cfg, dict) else hasattr(cfg, "output_router_logits")
    return MoE(int(experts), int(top_k), float(get("router_aux_loss_coef", 0.0) or 0.0), bool(has_logits))


def active_parameters(total: int, expert_parameters: int, moe: MoE | None) -> int:
    """Parameters one token runs through: the dense part plus top_k / num_experts of the experts
    (what FLOPs and MFU count; memory counts all of them)."""
    if moe is None or expert_parameters <= 0:
        return total
    return int(round(total - expert_parameters + expert_parameters * moe.active_fraction))


def is_expert_parameter(name: str) -> bool:
    """Routed-expert weights, by name: fused 3-D stacks (`mlp.experts.gate_up_proj`) and per-expert
    module lists (`experts.3.w1.weight`). A shared expert (`shared_expert`, `shared_experts`) runs for
    every token and is dense."""
    return "experts" in name.split(".")
