"""The token a fine-tuned model stops on: where the chat template ends assistant turns.

A template may end assistant turns with a token that is neither the tokenizer's eos_token nor in the
model's generation_config.eos_token_id (Meta-Llama-3-8B-Instruct as first released: turns end with
<|eot_id|>, eos_token is <|end_of_text|>). The model then learns to emit that token, and generation
runs on past it. `plan` and `sanity` say so once (`turn_end_token` finds the token: the last special
token of an assistant turn's labelled span on a probe conversation); the run adds its id
to the model's generation_config.eos_token_id, so the saved model (and the sample generations during
training) stop where the template ends turns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distsft.data.chat import ChatRenderer, chat_template_or_none

PROBES = ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
          [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello"}])


def turn_end_token(tokenizer: Any, template: str) -> str | None:
    """The special token that ends an assistant turn in `template` (the last one of the turn's
    labelled span on a probe conversation), or None (no template, no special token, or it refuses)."""
    try:
        r = ChatRenderer(tokenizer, template)
    except Exception:  # noqa: BLE001 - a broken template is reported by the data step
        return None
    if r.added is None:
        return None
    for msgs in PROBES:
        try:
            full, spans = r.assistant_spans(msgs)
        except Exception:  # noqa: BLE001 - e.g. a template without a system role: the next probe
            continue
        text = full[spans[-1].start:spans[-1].end]
        found = r.added.findall(text)
        return found[-1] if found else None
    return None


def turn_end_warning(tokenizer: Any, template: str | None, eos_ids: list[int]) -> tuple[str | None, list[int]]:
    """(a warning or None, the eos_token_id list the saved generation_config carries). `eos_ids`: the
    model's generation_config.eos_token_id as a list (empty when it has none: the tokenizer's eos)."""
    ids = list(dict.fromkeys(eos_ids)) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
    if not template:
        return None, ids
    token = turn_end_token(tokenizer, template)
    if token is None:
        return None, ids
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or tid in ids or token == tokenizer.eos_token:
        return None, ids
    carried = [*ids, tid]
    return (f"the chat template ends assistant turns with {token} (id {tid}), which is not the tokenizer's "
            f"eos_token ({tokenizer.eos_token}) nor in the model's generation_config.eos_token_id {ids}: a "
            f"fine-tuned model would not stop where its template ends turns. The saved model's "
            f"generation_config will carry eos_token_id {carried}"), carried


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
