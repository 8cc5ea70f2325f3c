"""Chat template rendering and exact assistant spans (character spans; tokens come in encode.py).

An assistant turn's span is the text the model must produce for it in the *final* rendered
conversation: its content (and reasoning / tool calls, where the template renders them), plus the
end-of-turn text the template writes after it (`<|im_end|>\\n`, `<|eot_id|>`, `</s>`, ...), never the
generation-prompt header and never another turn's text. Three ways to find it, all exact:

1. `{% generation %}` markers in the template: the spans transformers' tracker records (exact by
   construction, what `apply_chat_template(return_assistant_tokens_mask=True)` uses).
2. Prefix difference, when the template is prefix-stable for this turn: what
   `render(messages[:i+1])` adds after `render(messages[:i], add_generation_prompt=True)`.
3. Differential rendering otherwise (chatdiff.py; Qwen3 dropping earlier think blocks, Mistral moving the system
   message into the last user turn, Phi-3.5's final EOS): render the whole conversation again with
   turn i's content, reasoning and tool-call names replaced by unique sentinels; the stretch where
   the two renders differ is turn i's text in the final render. It is accepted only when it equals
   the variant's stretch with each sentinel put back (modulo the template's stripping), each
   sentinel appearing exactly once. Then it is extended over the text the template writes around
   the content when the turn is the last one (Mistral's space before the answer, the end-of-turn).

Whichever way, text that belongs to no message never carries loss: the last turn's span loses what
the template writes after the last message (a generation prompt written whatever
add_generation_prompt says, a final suffix like Phi-3's eos), split from the turn's own end by
turn_end.py (`without_trailing`); where the two cannot be told apart, `TemplateMismatch`. The
end-of-turn text is the end-of-turn token and the whitespace written right after it (`close`).

Anything else raises `TemplateMismatch` (the caller turns it into exit 2): no silent guess.
"""

from __future__ import annotations

import json
import re
from typing import Any

from distsft.data.chatdiff import content_end, diff_span
from distsft.data.turn_end import shared_end, turn_end
from distsft.data.turns import (REASONING_FIELDS, Span, TemplateMismatch, normalized, reasoning_of,
                                visible_content)
from distsft.errors import SpecError

# One more message after the conversation: what the template writes after a turn that is not the last.
PROBE = {"role": "user", "content": "Next question."}
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")



def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def chat_template_or_none(tokenizer: Any, override: str | None) -> str | None:
    """`data.chat_template` resolved (data/templates.py: a path, a tokenizer directory or config, a name)
    or the tokenizer's own template; None when there is none."""
    from distsft.data.templates import resolve
    return resolve(tokenizer, override).text


def resolve_chat_template(tokenizer: Any, override: str | None) -> str:
    template = chat_template_or_none(tokenizer, override)
    if not template:
        raise SpecError(f"tokenizer {tokenizer_name(tokenizer)} has no chat template; set data.chat_template "
                        "(a path to a .jinja file, a tokenizer directory or a named template such as chatml)")
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
        return env.from_string(GENERATION_TAG.sub("", template).replace("{% endgeneration %}", ""))


_DELIMS = re.compile("\ue010(.*?)\ue011", re.S)


def _delimited(template: str) -> Any:
    """The template compiled afresh (not transformers' cached copy, which apply_chat_template shares)
    with each `{% generation %}` block's output wrapped in U+E010 ... U+E011."""
    try:
        import jinja2
        from transformers.utils.chat_template_utils import _cached_compile_jinja_template
        compiled = _cached_compile_jinja_template(template)
        ext = next(e for e in compiled.environment.extensions.values() if hasattr(e, "_generation_support"))
    except (ImportError, StopIteration, AttributeError):  # pragma: no cover - another transformers layout
        return None

    @jinja2.pass_eval_context
    def delimit(eval_ctx: Any, caller: Any) -> str:
        return "\ue010" + caller() + "\ue011"

    ext._generation_support = delimit
    return compiled


def _has_delims(messages: list[dict], tools: Any) -> bool:
    for m in messages:
        for k, v in m.items():
            if isinstance(v, str):
                if "\ue010" in v or "\ue011" in v:
                    return True
            elif k != "role" and any(d in str(v) for d in "\ue010\ue011"):
                return True
    return tools is not None and any(d in str(tools) for d in "\ue010\ue011")


def _dropped(msg: dict, text: str) -> bool:
    """Whether the turn's reasoning (a field, or a think block inline in its content) is not in `text`."""
    r = reasoning_of(msg)
    content = msg.get("content")
    if r is None and isinstance(content, str) and "<think>" in content and "</think>" in content:
        r = content.split("</think>")[0].split("<think>")[-1]
    return bool(r and r.strip()) and r.strip() not in text


def _tool_names(msg: dict) -> list[str]:
    names = []
    for tc in msg.get("tool_calls") or ():
        fn = tc.get("function", tc) if isinstance(tc, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            names.append(fn["name"])
    return names


class ChatRenderer:
    """Renders conversations exactly as `tokenizer.apply_chat_template(..., tokenize=False)` does."""

    def __init__(self, tokenizer: Any, template: str):
        self.template = template
        self._compiled = _compile(template)
        self.has_markers = bool(GENERATION_TAG.search(template))
        self._delimited = _delimited(template) if self.has_markers else None
        self.reads_reasoning = any(f in template for f in REASONING_FIELDS)
        # apply_chat_template passes the special tokens (bos_token, eos_token, ...) as template variables.
        self._kwargs = {k: v for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}
        added = [t for t in (tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {})
                 if t.strip()]
        alt = "|".join(map(re.escape, sorted(added, key=len, reverse=True)))
        self.added = re.compile(alt) if added else None
        self._ends_added = re.compile(rf"(?:{alt})\s*\Z") if added else None
        self._next_added = re.compile(rf"\s*(?:{alt})") if added else None
        self._one_token = re.compile(rf"(?:{alt})\s*") if added else None

    # ------------------------------------------------------------------ rendering

    def _args(self, tools: Any, extra: dict | None) -> dict:
        return {**self._kwargs, **(extra or {}), "tools": tools, "documents": None}

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: Any = None,
               extra: dict | None = None) -> str:
        return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     **self._args(tools, extra))

    def render_marked(self, messages: list[dict], tools: Any = None, extra: dict | None = None
                      ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character spans of its `{% generation %}` blocks."""
        if self._delimited is not None:
            # One plain render with each block's output between two delimiters (~2x faster than the
            # tracker, which joins the output so far at every block); the tracker when the
            # conversation itself contains a delimiter.
            text = self._delimited.render(messages=messages, add_generation_prompt=False, **self._args(tools, extra))
            spans, shift = [], 0
            for m in _DELIMS.finditer(text):  # each block's span once the delimiters are gone
                spans.append((m.start() - shift, m.end() - shift - 2))
                shift += 2
            if text.count("\ue010") == text.count("\ue011") == len(spans) and not _has_delims(messages, tools):
                return text.replace("\ue010", "").replace("\ue011", ""), spans
        blocks: list[str] = []
        indices: list[tuple[int, int]] = []
        with self._compiled.environment.activate_tracker(blocks, indices):
            for block in self._compiled.generate(messages=messages, add_generation_prompt=False,
                                                 **self._args(tools, extra)):
                blocks.append(block)
        return "".join(blocks), indices

    def try_render(self, messages: list[dict], add_generation_prompt: bool, tools: Any, extra: dict | None
             ) -> str | None:
        if not messages:
            return None
        try:
            return self.render(messages, add_generation_prompt, tools, extra)
        except Exception:  # a template may refuse a prefix (e.g. "must end with a user turn")
            return None

    # ------------------------------------------------------------------ spans

    def assistant_spans(self, messages: list[dict], tools: Any = None, extra: dict | None = None,
                        turns: list[int] | None = None, method: str = "auto") -> tuple[str, list[Span]]:
        """The rendered conversation and the span of each assistant turn in `turns` (default: all).

        `method`: "auto" (markers if the template has them, else prefix difference where exact,
        else differential rendering), or "diff" to force differential rendering (cross-checks)."""
        want = [i for i, m in enumerate(messages) if m["role"] == "assistant" and (turns is None or i in turns)]
        if self.has_markers and method == "auto":
            full, spans = self._marked_spans(messages, tools, extra, want)
            return full, [self.without_trailing(full, messages, sp, tools, extra, marked=True) for sp in spans]
        full = self.render(messages, False, tools, extra)
        spans = []
        for i in want:
            span = self._prefix_span(full, messages, i, tools, extra) if method == "auto" else None
            spans.append(self.without_trailing(full, messages, span or diff_span(self, full, messages, i, tools, extra),
                                               tools, extra))
        return full, spans

    def without_trailing(self, full: str, messages: list[dict], span: Span, tools: Any, extra: dict | None,
                         marked: bool = False) -> Span:
        """The last message's span without the text the template writes after the last message
        (turn_end.py). Cheap when there is none: the span is the answer and one token, or the render
        without the last message shows that nothing after the turn is also written after another
        message, or only one token and whitespace."""
        if span.index != len(messages) - 1:
            return span
        content, text = messages[-1].get("content"), full[span.start:span.end]
        if isinstance(content, str) and content.strip() and self.added and any(
                (k := text.rfind(c)) >= 0 and (m := self._one_token.fullmatch(text, k + len(c)))
                and not self._header_token(m.group(), full, span) for c in (content.lstrip(), content.strip())):
            return span  # the answer, then one token (not its header's) and whitespace: nothing after it
        # A render whose last message is another one: what it ends with too may follow any message.
        other = self.try_render(messages[:-1], False, tools, extra)
        ext = None if other is not None else self.try_render([*messages, PROBE], False, tools, extra)
        other = other if other is not None else ext  # `ext` is rendered below when still needed
        after = full[span.start:]
        common = shared_end(after, other, self.added)
        stretch = after[len(after) - common:]
        if common == 0 or span.end <= len(full) - common or (
                self.added and self._one_token.fullmatch(stretch) and not self._header_token(stretch, full, span)):
            return span
        c = content_end(self, full, messages, span.index, tools, extra)
        if c is None or c < span.start:
            return span
        if ext is None:
            ext = self.try_render([*messages, PROBE], False, tools, extra)
        followed = ext[c:] if ext is not None and ext[:c] == full[:c] else None
        try:
            k = turn_end(full[c:], other, followed, self.added)
        except TemplateMismatch:
            if marked:  # the template's own markers say where the turn ends
                return span
            raise
        span.end = max(span.start, min(span.end, c + k))
        return span

    def _marked_spans(self, messages: list[dict], tools: Any, extra: dict | None, want: list[int]
                      ) -> tuple[str, list[Span]]:
        full, indices = self.render_marked(messages, tools, extra)
        merged: list[list[int]] = []
        for s, e in indices:  # a turn written in several touching blocks is one span
            if merged and s == merged[-1][1]:
                merged[-1][1] = e
            else:
                merged.append([s, e])
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if len(merged) != len(assistants):
            raise TemplateMismatch(f"the template's {{% generation %}} blocks ({len(merged)}) do not match the "
                                   f"conversation's {len(assistants)} assistant turns")
        by_turn = dict(zip(assistants, merged))
        out = []
        for i in want:
            s, e = by_turn[i]
            out.append(Span(i, s, e, _dropped(messages[i], full[s:e])))
        return full, out

    def _prefix_span(self, full: str, messages: list[dict], i: int, tools: Any, extra: dict | None
                     ) -> Span | None:
        """The span when the conversation up to turn i renders as a prefix of the whole (exact then)."""
        pre = self.try_render(messages[:i], True, tools, extra)
        thru = full if i == len(messages) - 1 else self.try_render(messages[: i + 1], False, tools, extra)
        if not (pre is not None and thru is not None and len(pre) < len(thru)
                and full.startswith(thru) and thru.startswith(pre)):
            return None
        s, e = len(pre), len(thru)
        text, msg = full[s:e], messages[i]
        content = msg.get("content")
        if isinstance(content, str) and content.strip() and not any(
                normalized(v) in normalized(text) for v in visible_content(content)):
            return None  # e.g. a template that renders list-of-parts content only: let the checks decide
        if any(n not in text for n in _tool_names(msg)):
            return None
        return self.close(full, Span(i, s, e, _dropped(msg, text)))

    def _header_token(self, token: str, full: str, span: Span) -> bool:
        """Whether `token` (and whitespace) is also the last special token before the turn: its header's,
        written again after it (a generation prompt), not an end-of-turn token."""
        before = self.added.findall(full, max(0, span.start - 64), span.start)
        return bool(before) and before[-1] == token.strip()

    def close(self, full: str, span: Span) -> Span:
        if self.added and not self._ends_added.search(full, max(span.start, span.end - 64), span.end):
            # No end-of-turn token after the answer (GLM-4): the model stops by emitting the next
            # header token (<|user|>), so that token is the target to learn.
            if m := self._next_added.match(full, span.end):
                span.end = m.end()
        if self.added and self._ends_added.search(full, max(span.start, span.end - 64), span.end):
            # The end-of-turn token and the whitespace written right after it, up to the next message
            # (OLMo-2 writes "\n" after eos only when another message follows).
            span.end += len(full[span.end:]) - len(full[span.end:].lstrip())
        return span

