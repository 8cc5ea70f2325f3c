"""Chat templates that break the assumptions of span finding (issue 25): real families beyond
../shared/real-templates/ (tests/data/real_templates/, provenance in its PROVENANCE.md) and templates
written for one assumption each (tests/data/adversarial_templates/, see its README.md). Each template
that distsft must accept has a `{% generation %}`-marked copy (the independent reference); the others
must be refused with exit 2."""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

from real_templates import CONVERSATIONS, HERE, MARKED, REAL, a, family_tokenizer, u
from real_templates import tokenizer as real_tokenizer

ADVERSARIAL = HERE / "adversarial_templates"

# template -> (npm tokenizer, special tokens to set, extra special tokens). As in real_templates.py:
# where the family's own tokenizer is not on a registry, a related one gets the template's tokens.
REAL_FAMILIES = {
    # Meta-Llama-3-8B-Instruct as first released: eos_token <|end_of_text|>, turns end with <|eot_id|>.
    "llama-3-8b-instruct-original": ("llama3_1", {"eos_token": "<|end_of_text|>"}, []),
    "phi-4-mini-instruct": ("gpt35turbo", {"eos_token": "<|endoftext|>"},
                            ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>", "<|/tool|>"]),
    "olmo-2-1124-7b-instruct": ("gpt35turbo", {"eos_token": "<|endoftext|>"}, []),
    "deepseek-coder-1.3b-instruct": ("qwen3", {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<|EOT|>"},
                                     ["<｜begin▁of▁sentence｜>", "<|EOT|>"]),
    "qwen1.5-0.5b-chat-gguf": ("qwen3", {}, []),
    "exaone-3.5-7.8b-instruct": ("llama2", {"eos_token": "[|endofturn|]"},
                                 ["[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]"]),
    "nemotron-mini-4b-instruct": ("llama2", {}, ["<extra_id_0>", "<extra_id_1>"]),
}
ADVERSARIAL_TEMPLATES = sorted(p.stem for p in ADVERSARIAL.glob("*.jinja"))
# Refused: the last assistant turn has no end-of-turn token of its own before the text the template
# writes after the last message, so where the turn ends cannot be told.
REFUSED = ("nemotron-mini-4b-instruct", "glued-header-trailing-prompt", "plain-text-trailing-prompt")
ACCEPTED = sorted(t for t in (*REAL_FAMILIES, *ADVERSARIAL_TEMPLATES) if t not in REFUSED)


@lru_cache(maxsize=None)
def _real(name: str):
    return family_tokenizer(*REAL_FAMILIES[name], name)


@lru_cache(maxsize=1)
def _adversarial():
    """Qwen3's tokenizer (ChatML tokens) plus the special tokens the adversarial templates write."""
    tok = copy.deepcopy(real_tokenizer("qwen3-0.6b"))
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>", "<|return|>", "<|user|>", "<|assistant|>",
                                                          "<|system|>"]})
    tok.name_or_path = "qwen3 (for the adversarial templates)"
    return tok


def tokenizer(name: str):
    return _real(name) if name in REAL_FAMILIES else _adversarial()


def template_path(name: str, marked: bool = False) -> Path:
    if name in REAL_FAMILIES:
        return (MARKED if marked else REAL) / f"{name}.jinja"
    return (ADVERSARIAL / "marked" if marked else ADVERSARIAL) / f"{name}.jinja"


# Conversations beyond real_templates.CONVERSATIONS: an answer the template rewrites (trim, a tag
# lower-cased), a conversation that opens with an assistant turn, one that ends with a user turn.
EXTRA = {
    "tagged": {"messages": [u("Wrap the letter: which is a fruit? A) car B) apple"), a("  <Answer>B</Answer>  \n"),
                            u("And who wrote the first program?"), a("<Answer>Ada Lovelace</Answer>")]},
    "assistant_first": {"messages": [a("Hello! Ask me which is a fruit."), u("Which is a fruit? A) car B) apple"),
                                     a("B")]},
    "ends_with_user": {"messages": [u("Pick one: A) car B) apple"), a("B"), u("Thanks! B it is.")]},
}
ALL_CONVERSATIONS = {**CONVERSATIONS, **EXTRA}


def cases() -> list[tuple[str, str]]:
    return [(t, c) for t in ACCEPTED for c in ALL_CONVERSATIONS]
