"""Tiny sliding-window models built from configs (nothing downloaded) and the two eval losses the
sliding-window tests compare: distsft's, over packed rows, and each example's own, unpacked.

    PYTHONPATH=tests/shims/flash_attn:tests:src python tests/sliding_models.py   # the FA2 stand-in checks, as JSON

Every example is longer than the window (4), so a packed path that loses the window (a prebuilt 4-D
block mask handed unchanged to the sliding layers, as distsft did before issue 19) changes the loss."""
from __future__ import annotations

import contextlib
import json
from typing import Any

import numpy as np
import torch

WINDOW = 4
VOCAB = 320
LENGTHS = (7, 12, 5, 9, 6, 11)
GROUPS = ((0, 1, 2), (3, 4, 5))
PAD = 0

# (name, class, config class, extra config, attention backends the architecture supports)
MODELS = {
    "mistral": ("MistralForCausalLM", "MistralConfig", {}, ("sdpa", "eager", "flash_attention_2")),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 16}, ("eager", "flash_attention_2")),
    "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig",
               {"head_dim": 16, "layer_types": ["sliding_attention", "full_attention"] * 2},
               ("sdpa", "eager", "flash_attention_2")),
}


def build(name: str, attn: str, window: int | None = WINDOW, dtype: torch.dtype = torch.float32) -> Any:
    """Seeded tiny model; window=None builds the same weights without a sliding window."""
    import transformers
    cls_name, cfg_name, extra, _ = MODELS[name]
    cfg = getattr(transformers, cfg_name)(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=window if window else 4096, pad_token_id=PAD,
        initializer_range=0.2, **extra)  # peaked attention: the window visibly changes the loss
    if name == "mistral" and window is None:
        cfg.sliding_window = None
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)._from_config(cfg, attn_implementation=attn, dtype=dtype)
    return model.eval()


def rows(seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    ex = []
    for n in LENGTHS:
        ids = rng.integers(5, VOCAB, size=n)
        labels = ids.copy()
        labels[: n // 3] = -100  # a prompt without loss
        ex.append((ids, labels))
    return [{"input_ids": np.concatenate([ex[i][0] for i in g]).tolist(),
             "labels": np.concatenate([ex[i][1] for i in g]).tolist(),
             "seq_lengths": [len(ex[i][0]) for i in g]} for g in GROUPS]


def reference_loss(model: Any, packed_rows: list[dict[str, Any]], autocast: bool = False) -> float:
    """Token-weighted loss with every example run alone. In fp32 through the model's own forward and
    logits; under bf16 autocast through the same fused head as the packed eval (the model's own bf16
    logits are rounded to 1/8 near Gemma-2's soft cap, which would hide what is compared: the attention)."""
    total, count = 0.0, 0
    for row in packed_rows:
        start = 0
        for n in row["seq_lengths"]:
            ids = torch.tensor(row["input_ids"][start:start + n])[None]
            labels = torch.tensor(row["labels"][start:start + n])
            start += n
            with torch.no_grad(), _autocast(autocast):
                if autocast:
                    _fuse(model)
                    out = model(input_ids=ids, labels=labels[None], fused_lm_head=True, use_cache=False)
                    total += -float(out.log_probs.float().sum())
                else:
                    logits = model(input_ids=ids, use_cache=False).logits.float()[0]
                    total += float(torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100,
                                                                     reduction="sum"))
            count += int((labels[1:] != -100).sum())
    return total / count


def _fuse(model: Any) -> None:
    """TRL's fused LM head, which its SFTTrainer adds to every model it trains (once)."""
    from trl.trainer import add_fused_lm_head
    if not getattr(model, "_test_fused_head", False):
        add_fused_lm_head(model)
        model._test_fused_head = True


def packed_eval_loss(model: Any, packed_rows: list[dict[str, Any]], attn: str, autocast: bool = False) -> float:
    """distsft's eval: its collator packs the rows, its eval loss runs the model's training forward."""
    from distsft.data.collate import PackedCollator
    from distsft.train.eval_loss import token_loss_sum
    _fuse(model)
    batch = PackedCollator(PAD, attn)(packed_rows)
    labels = batch.pop("labels")
    with torch.no_grad(), _autocast(autocast):
        total, count = token_loss_sum(model, batch, labels)
    return float(total) / count


def _autocast(on: bool) -> Any:
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def flash_attention_checks() -> dict[str, Any]:
    """Under the FA2 stand-in: fp32 weights (distsft's fp32 masters) evaluated under bf16 autocast."""
    out: dict[str, Any] = {}
    data = rows()
    for name in MODELS:
        model = build(name, "flash_attention_2")
        no_window = build(name, "flash_attention_2", window=None)
        out[name] = {"attn": model.config._attn_implementation,
                     "packed": packed_eval_loss(model, data, "flash_attention_2", autocast=True),
                     "reference": reference_loss(model, data, autocast=True),
                     "no_window_reference": reference_loss(no_window, data, autocast=True)}
    return out


if __name__ == "__main__":
    print(json.dumps(flash_attention_checks()))
