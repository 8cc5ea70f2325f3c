"""What the chat renderer and differential rendering share about turns: the span type, the mismatch
error, and what a template may render of a message's content and reasoning. Below both, so that
chat (the renderer) and chatdiff (its fallback) import it instead of each other."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Protocol

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # as transformers aliases them


class TemplateMismatch(Exception):
    """An assistant turn's span cannot be located unambiguously in the rendered conversation."""


@dataclass
class Span:
    index: int                 # the assistant message's index in the conversation
    start: int                 # [start, end) in the rendered text
    end: int
    reasoning_dropped: bool = False  # the turn has reasoning that the template did not render here


def visible_content(content: str) -> list[str]:
    """What a template may render of a content string: itself, or (templates that split out an
    inline think block, like DeepSeek-R1's) the part after `</think>`; both modulo stripping."""
    out = [content.strip()]
    if "</think>" in content:
        out.append(content.split("</think>")[-1].strip())
    return out


def normalized(text: str) -> str:
    """Text as compared with what a template rendered of it: modulo whitespace runs and letter case
    (templates trim the content, or rewrite a tag in it, like `<Answer>` -> `<answer>`)."""
    return re.sub(r"\s+", " ", text).strip().lower()


def reasoning_of(msg: dict) -> str | None:
    return next((msg[k] for k in REASONING_FIELDS if isinstance(msg.get(k), str) and msg[k].strip()), None)


class Renderer(Protocol):
    """The renderer differential rendering drives (data.chat.ChatRenderer)."""
    added: Any  # the tokenizer's added tokens as one regex, or None

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: Any = None,
               extra: dict | None = None) -> str: ...

    def try_render(self, messages: list[dict], add_generation_prompt: bool, tools: Any,
                   extra: dict | None) -> str | None: ...

    def close(self, full: str, span: Span) -> Span: ...
