"""The chat template's end-of-turn token(s) and the generation_config that stops on them.

A fine-tuned chat model ends its answer with the template's end-of-turn token (`<|im_end|>`,
`<|eot_id|>`, `<end_of_turn>`), which is often not the tokenizer's EOS: an export whose
generation_config lists only EOS never stops generating under `generate()`, vLLM or TGI. The token is
found from the template itself, as training's labels saw it: the special tokens the template writes
right after an assistant turn's content (data.chat's exact assistant span).
"""

from __future__ import annotations

from typing import Any

from distsft.data.chat import ChatRenderer, TemplateMismatch

_PROBE = "Sure, 42."


def special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for tid, tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(tok, "special", False):
            ids.add(int(tid))
    return ids


def end_of_turn_ids(tokenizer: Any, template: str) -> list[int]:
    """Special token ids the template writes after an assistant turn's content (usually one); [] when it
    writes none (the model then ends on EOS) or the turn cannot be located exactly."""
    renderer = ChatRenderer(tokenizer, template)
    messages = [{"role": "user", "content": "What is 6 x 7?"}, {"role": "assistant", "content": _PROBE}]
    try:
        full, spans = renderer.assistant_spans(messages)
    except (TemplateMismatch, Exception):  # noqa: BLE001 - a template that cannot render this probe
        return []
    if not spans:
        return []
    text = full[spans[0].start:spans[0].end]
    at = text.rfind(_PROBE)
    tail = text[at + len(_PROBE):] if at >= 0 else text
    specials = special_ids(tokenizer)
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for i in ids:
        if i in specials and i not in out:
            out.append(int(i))
    return out


def eos_list(*groups: Any) -> list[int]:
    """Token ids from ints, lists or None, in order, without repeats."""
    out: list[int] = []
    for g in groups:
        for i in ([g] if isinstance(g, int) else list(g or [])):
            if i is not None and int(i) not in out:
                out.append(int(i))
    return out


def generation_config(source_dir: Any, model_config: Any, tokenizer: Any, template: str) -> Any:
    """The source's generation_config (else one from the model config), with eos_token_id = its EOS
    plus the template's end-of-turn token(s), and a pad token."""
    from transformers import GenerationConfig
    try:
        gen = GenerationConfig.from_pretrained(source_dir)
    except (OSError, ValueError):
        gen = GenerationConfig.from_model_config(model_config)
    eos = eos_list(gen.eos_token_id, tokenizer.eos_token_id, end_of_turn_ids(tokenizer, template))
    gen.eos_token_id = eos[0] if len(eos) == 1 else eos
    if gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    return gen
