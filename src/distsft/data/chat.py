"""Chat template rendering and assistant-span location (character spans; tokens come in encode.py).

The loss mask is computed on characters, not on template markers: for assistant turn i, the text the
model must produce is what `render(messages[:i+1])` adds after `render(messages[:i],
add_generation_prompt=True)` -- the content plus whatever the template writes after it (<|im_end|>,
<|eot_id|>, </s>, ...), but not the generation-prompt header. That works for any template, with or
without `{% generation %}` markers. Tokens are then labelled by their character offsets.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from distsft.spec import SpecError


class TemplateMismatch(Exception):
    """The template rewrites an assistant message so that it cannot be found in the rendered text."""


def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def resolve_chat_template(tokenizer: Any, override: str | None) -> str:
    """`data.chat_template` (a Jinja string or a path to a .jinja file) or the tokenizer's own template."""
    template = getattr(tokenizer, "chat_template", None)
    if override:
        if isinstance(template, dict) and override in template:  # a named variant, e.g. "tool_use"
            return template[override]
        if "{" not in override and Path(override).is_file():
            return Path(override).read_text()
        return override
    if isinstance(template, dict):  # named variants: the default one is what apply_chat_template uses
        template = template.get("default")
    if not template:
        raise SpecError(f"tokenizer {tokenizer_name(tokenizer)} has no chat template; set data.chat_template "
                        "(a Jinja template string or a path to a .jinja file)")
    return template


def _compile(template: str) -> Any:
    # transformers' own sandboxed environment (generation tag, tojson, raise_exception, strftime_now),
    # compiled once; rendering it directly skips apply_chat_template's per-call overhead (~2x).
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
        return _compile_jinja_template(template)
    except ImportError:  # pragma: no cover - older/newer transformers layout
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(msg: str) -> None:
            raise jinja2.exceptions.TemplateError(msg)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, **k: json.dumps(x, ensure_ascii=False, **k)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(template.replace("{% generation %}", "").replace("{% endgeneration %}", ""))


class ChatRenderer:
    """Renders conversations exactly as `tokenizer.apply_chat_template(..., tokenize=False)` does."""

    def __init__(self, tokenizer: Any, template: str):
        self.template = template
        self._compiled = _compile(template)
        # apply_chat_template passes the special tokens (bos_token, eos_token, ...) as template variables.
        self._kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        added = [t for t in (tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {})
                 if t.strip()]
        alt = "|".join(map(re.escape, sorted(added, key=len, reverse=True)))
        self._added = re.compile(alt) if added else None
        self._ends_added = re.compile(rf"(?:{alt})\s*\Z") if added else None
        self._next_added = re.compile(rf"\s*(?:{alt})") if added else None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._compiled.render(messages=messages, tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt, **self._kwargs)

    def _try(self, messages: list[dict], add_generation_prompt: bool) -> str | None:
        try:
            return self.render(messages, add_generation_prompt)
        except Exception:  # a template may refuse a prefix (e.g. "must end with a user turn")
            return None

    def assistant_spans(self, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the [start, end) character span of each assistant turn."""
        full = self.render(messages)
        spans: list[tuple[int, int]] = []
        cursor = 0
        last = len(messages) - 1
        for i, msg in enumerate(messages):
            if msg["role"] != "assistant":
                continue
            pre = self._try(messages[:i], True)
            thru = full if i == last else self._try(messages[: i + 1], False)
            if (pre is not None and thru is not None and cursor <= len(pre) < len(thru)
                    and full.startswith(thru) and thru.startswith(pre)):
                span = (len(pre), len(thru))  # the usual, prefix-preserving case
            else:
                span = self._search_span(full, msg["content"], pre, thru, cursor, i)
            # Templates that expect list-of-parts content (VLMs) silently render nothing for a string.
            tail = msg["content"].strip()[-32:]
            if tail not in full[span[0]:span[1]]:
                raise TemplateMismatch(f"assistant message {i} does not appear in the rendered chat")
            if self._added and not self._ends_added.search(full, max(span[0], span[1] - 64), span[1]):
                # No end-of-turn token after the answer (GLM-4): the model stops by emitting the next
                # header token (<|user|>), so that token is the target to learn.
                if m := self._next_added.match(full, span[1]):
                    span = (span[0], m.end())
            spans.append(span)
            cursor = span[1]
        return full, spans

    def _search_span(self, full: str, content: str, pre: str | None, thru: str | None, cursor: int,
                     i: int) -> tuple[int, int]:
        """Fallback for templates that render a turn differently when it is not the last one (Qwen3
        drops the empty think block, gpt-oss ends it with <|end|> instead of <|return|>): find the
        content after `cursor`, start at the generation prompt when that is still a prefix, and
        extend over the end-of-turn text the template writes after it."""
        for needle in (content, content.strip()):
            k = full.find(needle, cursor) if needle else -1
            if k >= 0:
                break
        else:
            raise TemplateMismatch(f"assistant message {i} does not appear verbatim in the rendered chat")
        start = len(pre) if pre is not None and cursor <= len(pre) <= k and full.startswith(pre) else k
        end = k + len(needle)
        n = 0
        if thru is not None and (j := thru.rfind(needle)) >= 0:
            tail = thru[j + len(needle):]  # what follows the content when this turn is the last one
            while n < len(tail) and end + n < len(full) and full[end + n] == tail[n]:
                n += 1
            for m in self._added.finditer(tail) if self._added else ():
                if m.start() < n < m.end():  # never stop inside a special token
                    n = m.start()
                    break
        if n == 0 and self._added and (m := self._added.match(full, end)):
            n = m.end() - end  # nothing in common: the turn's own end-of-turn token
        return start, end + n
