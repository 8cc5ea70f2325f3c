"""Which chat template a run trains with: `data.chat_template` (config/templates.py says what it may
be) or the tokenizer's own, and the trained template saved with the model.

`apply_to_tokenizer` makes the resolved template the tokenizer's, so that every `save_pretrained` (the
output directory, each checkpoint, an export) writes it as `chat_template.jinja`: whoever serves the
model prompts it in the format it was trained on (before, they kept the tokenizer's original template
while the model had learned `data.chat_template`'s).
"""

from __future__ import annotations

from typing import Any

from distsft.config.templates import KEY, Template, expected, looks_like_path, no_such_path, resolve_text
from distsft.errors import SpecError

# Set on a tokenizer by apply_to_tokenizer: (the spec's value, the template), so that resolving the
# same value again (generation, the cache key) gives the same text although the tokenizer's own
# template (a dict of variants, say) has been replaced.
_APPLIED = "distsft_chat_template"


def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def resolve(tokenizer: Any, value: str | None) -> Template:
    """The template the run trains with: `value` resolved, or the tokenizer's own."""
    applied = getattr(tokenizer, _APPLIED, None)
    if applied is not None and applied[0] == value:
        return applied[1]
    own = getattr(tokenizer, "chat_template", None)
    if value:
        found = resolve_text(value)
        if found is not None:
            return found
        if isinstance(own, dict) and value in own:
            return Template(own[value], f"{KEY}: {value} (a named template of the tokenizer {tokenizer_name(tokenizer)})")
        if looks_like_path(value):
            raise SpecError(no_such_path(value))
        variants = f"; the tokenizer's own variants are {', '.join(sorted(own))}" if isinstance(own, dict) else ""
        raise SpecError(expected(value) + variants)
    if isinstance(own, dict):  # named variants: the default one is what apply_chat_template uses
        own = own.get("default")
    return Template(own or None, f"the chat template of the tokenizer {tokenizer_name(tokenizer)}")


def apply_to_tokenizer(tokenizer: Any, value: str | None) -> Template:
    """Make the trained template the tokenizer's (saved with it as chat_template.jinja)."""
    t = resolve(tokenizer, value)
    if value and t.text:  # unset: the tokenizer's own templates (all its variants) stay as they are
        tokenizer.chat_template = t.text
    setattr(tokenizer, _APPLIED, (value, t))
    return t
