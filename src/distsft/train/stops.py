"""The token a fine-tuned model stops on: where the chat template ends assistant turns.

A template may end assistant turns with a token that is neither the tokenizer's eos_token nor in the
model's generation_config.eos_token_id (Meta-Llama-3-8B-Instruct as first released: turns end with
<|eot_id|>, eos_token is <|end_of_text|>). The model then learns to emit that token, and generation
runs on past it. `plan` and `sanity` say so once (data.turn_end finds the token); the run adds its id
to the model's generation_config.eos_token_id, so the saved model (and the sample generations during
training) stop where the template ends turns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def generation_eos(name_or_path: str) -> list[int]:
    """The model's generation_config.eos_token_id as a list, from local files ([] when there is none)."""
    try:
        from transformers import GenerationConfig
        eos = GenerationConfig.from_pretrained(name_or_path, local_files_only=True).eos_token_id
    except Exception:  # noqa: BLE001 - no generation_config.json: the tokenizer's eos is what stops
        return []
    return _as_list(eos)


def _as_list(eos: Any) -> list[int]:
    return [] if eos is None else [int(eos)] if isinstance(eos, int) else [int(x) for x in eos]


def turn_end_check(spec: Any, tokenizer: Any, eos: list[int] | None = None) -> tuple[str | None, list[int]]:
    """(the warning or None, the eos_token_id list the saved generation_config carries)."""
    from distsft.data.chat import chat_template_or_none
    from distsft.data.turn_end import turn_end_warning
    try:
        template = chat_template_or_none(tokenizer, spec.data.chat_template)
    except Exception:  # noqa: BLE001 - an unreadable template is the data step's to report
        return None, []
    if spec.data.format == "text" or not template:
        return None, []
    return turn_end_warning(tokenizer, template, generation_eos(spec.model.name_or_path) if eos is None else eos)


def plan_warnings(spec: Any) -> list[str]:
    """For `distsft plan`, when the tokenizer can be read locally."""
    from distsft.train.tokens import load_tokenizer
    try:
        msg, _ = turn_end_check(spec, load_tokenizer(spec, local_files_only=True))
    except Exception:  # noqa: BLE001 - an unreadable tokenizer is reported by the data step already
        return []
    return [f"data: {msg}"] if msg else []


def sanity_results(spec: Any) -> list[tuple[str, str]]:
    """For `distsft sanity`: WARN when the template and the tokenizer disagree on the end of a turn."""
    return [("WARN", w) for w in plan_warnings(spec)]


def carry_turn_end(model: Any, tokenizer: Any, spec: Any) -> list[int] | None:
    """Add the template's end-of-turn token to the model's generation_config.eos_token_id (the saved
    generation_config.json carries it); the new list, or None when nothing changed."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return None
    msg, ids = turn_end_check(spec, tokenizer, _as_list(config.eos_token_id))
    if msg is None:
        return None
    config.eos_token_id = ids
    return ids


def write_generation_config(model: Any, *dirs: str | Path) -> None:
    """The trained model's generation_config next to an adapter or a merged copy, whose own saving
    does not write it (PEFT saves the adapter only; the merge reloads the base's)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return
    for d in dirs:
        if Path(d).is_dir():
            config.save_pretrained(str(d))
