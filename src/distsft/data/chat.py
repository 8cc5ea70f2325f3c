"""Chat template rendering and exact assistant spans (character spans; tokens come in encode.py).

An assistant turn's span is the text the model must produce for it in the *final* rendered
conversation: its content (and reasoning / tool calls, where the template renders them), plus the
end-of-turn text the template writes after it (`<|im_end|>\\n`, `<|eot_id|>`, `</s>`, ...), never the
generation-prompt header and never another turn's text. Three ways to find it, all exact:

1. `{% generation %}` markers in the template: the spans transformers' tracker records (exact by
   construction, what `apply_chat_template(return_assistant_tokens_mask=True)` uses).
2. Prefix difference, when the template is prefix-stable for this turn: what
   `render(messages[:i+1])` adds after `render(messages[:i], add_generation_prompt=True)`.
3. Differential rendering otherwise (Qwen3 dropping earlier think blocks, Mistral moving the system
   message into the last user turn, Phi-3.5's final EOS): render the whole conversation again with
   turn i's content, reasoning and tool-call names replaced by unique sentinels; the stretch where
   the two renders differ is turn i's text in the final render. It is accepted only when it equals
   the variant's stretch with each sentinel put back (modulo the template's stripping), each
   sentinel appearing exactly once. Then it is extended over the text the template writes around
   the content when the turn is the last one (Mistral's space before the answer, the end-of-turn).

Anything else raises `TemplateMismatch` (the caller turns it into exit 2): no silent guess.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.spec import SpecError

GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # as transformers aliases them


_KINDS = {"content": "content", "reasoning": "reasoning", "name": "tool calls"}


class TemplateMismatch(Exception):
    """An assistant turn's span cannot be located unambiguously in the rendered conversation."""


@dataclass
class Span:
    index: int                 # the assistant message's index in the conversation
    start: int                 # [start, end) in the rendered text
    end: int
    reasoning_dropped: bool = False  # the turn has reasoning that the template did not render here


def tokenizer_name(tokenizer: Any) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def chat_template_or_none(tokenizer: Any, override: str | None) -> str | None:
    """`data.chat_template` (a Jinja string, a path to a .jinja file or a named variant) or the
    tokenizer's own template; None when there is none."""
    template = getattr(tokenizer, "chat_template", None)
    if override:
        if isinstance(template, dict) and override in template:  # a named variant, e.g. "tool_use"
            return template[override]
        if "{" not in override and Path(override).is_file():
            return Path(override).read_text()
        return override
    if isinstance(template, dict):  # named variants: the default one is what apply_chat_template uses
        template = template.get("default")
    return template or None


def resolve_chat_template(tokenizer: Any, override: str | None) -> str:
    template = chat_template_or_none(tokenizer, override)
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


def _lcp(a: str, b: str, limit: int) -> int:
    """Length of the common prefix of a and b (at most `limit`), by bisection on C-speed slices."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _lcs(a: str, b: str, limit: int) -> int:
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[len(a) - mid:] == b[len(b) - mid:]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _diff(a: str, b: str) -> tuple[int, int]:
    """(common prefix length, common suffix length) of a and b, not overlapping."""
    p = _lcp(a, b, min(len(a), len(b)))
    return p, _lcs(a, b, min(len(a), len(b)) - p)


def visible_content(content: str) -> list[str]:
    """What a template may render of a content string: itself, or (templates that split out an
    inline think block, like DeepSeek-R1's) the part after `</think>`; both modulo stripping."""
    out = [content.strip()]
    if "</think>" in content:
        out.append(content.split("</think>")[-1].strip())
    return out


def reasoning_of(msg: dict) -> str | None:
    return next((msg[k] for k in REASONING_FIELDS if isinstance(msg.get(k), str) and msg[k].strip()), None)


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
        self._added = re.compile(alt) if added else None
        self._ends_added = re.compile(rf"(?:{alt})\s*\Z") if added else None
        self._next_added = re.compile(rf"\s*(?:{alt})") if added else None

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

    def _try(self, messages: list[dict], add_generation_prompt: bool, tools: Any, extra: dict | None
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
            return self._marked_spans(messages, tools, extra, want)
        full = self.render(messages, False, tools, extra)
        spans = []
        for i in want:
            span = self._prefix_span(full, messages, i, tools, extra) if method == "auto" else None
            spans.append(span or self._diff_span(full, messages, i, tools, extra))
        return full, spans

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
        pre = self._try(messages[:i], True, tools, extra)
        thru = full if i == len(messages) - 1 else self._try(messages[: i + 1], False, tools, extra)
        if not (pre is not None and thru is not None and len(pre) < len(thru)
                and full.startswith(thru) and thru.startswith(pre)):
            return None
        s, e = len(pre), len(thru)
        text, msg = full[s:e], messages[i]
        content = msg.get("content")
        if isinstance(content, str) and content.strip() and not any(v in text for v in visible_content(content)):
            return None  # e.g. a template that renders list-of-parts content only: let the checks decide
        if any(n not in text for n in _tool_names(msg)):
            return None
        return self._close(full, Span(i, s, e, _dropped(msg, text)))

    def _close(self, full: str, span: Span) -> Span:
        if self._added and not self._ends_added.search(full, max(span.start, span.end - 64), span.end):
            # No end-of-turn token after the answer (GLM-4): the model stops by emitting the next
            # header token (<|user|>), so that token is the target to learn.
            if m := self._next_added.match(full, span.end):
                span.end = m.end()
        return span

    def _variant(self, messages: list[dict], i: int, taken: str) -> tuple[list[dict], list[tuple[str, str, str]]]:
        """Messages with turn i's content, reasoning and tool-call names replaced by sentinels, and
        the (kind, sentinel, original) triples."""
        a, b = next((x, y) for x, y in (("\ue000", "\ue001"), ("\U000f0000", "\U000f0001"), ("\x1e", "\x1f"))
                    if x not in taken and y not in taken)
        msg = dict(messages[i])
        sentinels = []
        content = msg.get("content")
        if isinstance(content, str) and content.strip():
            sentinels.append(("content", f"{a}C{b}", content))
            msg["content"] = f"{a}C{b}"
        r = reasoning_of(msg)
        if r is not None:
            sentinels.append(("reasoning", f"{a}R{b}", r))
            for k in REASONING_FIELDS:
                if k in msg:
                    msg[k] = f"{a}R{b}"
        if msg.get("tool_calls"):
            calls = []
            for k, tc in enumerate(msg["tool_calls"]):
                tc = dict(tc)
                holder = "function" if isinstance(tc.get("function"), dict) else None
                fn = dict(tc[holder]) if holder else tc
                if isinstance(fn.get("name"), str):
                    sentinels.append(("name", f"{a}N{k}{b}", fn["name"]))
                    fn["name"] = f"{a}N{k}{b}"
                if holder:
                    tc[holder] = fn
                calls.append(tc)
            msg["tool_calls"] = calls
        out = list(messages)
        out[i] = msg
        return out, sentinels

    def _diff_span(self, full: str, messages: list[dict], i: int, tools: Any, extra: dict | None) -> Span:
        variant, sentinels = self._variant(messages, i, full)
        if not sentinels:
            raise TemplateMismatch(f"assistant turn {i} has no content, reasoning or tool calls to locate")
        try:
            v = self.render(variant, False, tools, extra)
        except Exception as exc:
            raise TemplateMismatch(f"the template cannot render assistant turn {i} with its content replaced "
                                   f"({type(exc).__name__}: {exc})") from None
        p, s = _diff(full, v)
        region, vregion = full[p:len(full) - s], v[p:len(v) - s]
        dropped = self._verify(region, vregion, v, sentinels, i)
        # The text the template writes around the content when this turn is the last one: the part
        # after it (end-of-turn) as far as the final render agrees, the part before it (after the
        # generation prompt, e.g. Mistral's space) where the final render has it.
        last = i == len(messages) - 1
        thru = full if last else self._try(messages[: i + 1], False, tools, extra)
        tail = ""
        if thru is not None:
            try:
                ts = s if last else _diff(thru, self.render(variant[: i + 1], False, tools, extra))[1]
            except Exception:
                ts = 0
            tail = thru[len(thru) - ts:]
        if dropped:  # measure the lead on the turn as the final render shows it: without its reasoning
            messages, variant = ([*m[:i], {k: x for k, x in m[i].items() if k not in REASONING_FIELDS}, *m[i + 1:]]
                                 for m in (messages, variant))
        start = p - self._lead_len(full, p, self._lead(messages, variant, i, tools, extra))
        end = len(full) - s
        return self._close(full, Span(i, start, end + self._tail_len(full, end, tail), dropped))

    def _lead(self, messages: list[dict], variant: list[dict], i: int, tools: Any, extra: dict | None) -> str:
        """What the template writes between the generation prompt and turn i's content, measured on
        the shortest conversation ending at turn i that renders prefix-stably: itself, without its
        system message (Mistral moves it), or only the user turn before it."""
        probes = [list(range(i + 1))]
        if any(messages[k]["role"] == "system" for k in range(i)):
            probes.append([k for k in range(i + 1) if messages[k]["role"] != "system"])
        users = [k for k in range(i) if messages[k]["role"] == "user"]
        if users:
            probes.append([users[-1], i])
        for idx in probes:
            msgs = [messages[k] for k in idx]
            pre = self._try(msgs[:-1], True, tools, extra)
            thru = self._try(msgs, False, tools, extra)
            if pre is None or thru is None:
                continue
            start = len(pre) if thru.startswith(pre) else None
            if start is None:
                # The turn departs from the generation prompt inside it (Nemotron: the prompt opens a
                # think block that the rendered turn writes empty): the lead starts where they part.
                # Parting earlier (Mistral's system message) is no lead at all.
                bare = self._try(msgs[:-1], False, tools, extra)
                start = _lcp(pre, thru, min(len(pre), len(thru)))
                if bare is None or not pre.startswith(bare) or start < len(bare):
                    continue
            v = self._try([variant[k] for k in idx], False, tools, extra)
            if v is None:
                continue
            tp = _diff(thru, v)[0]
            if tp >= start:
                return thru[start:tp]
        return ""

    def _lead_len(self, full: str, p: int, lead: str) -> int:
        """How far the span extends before the content: all of `lead` when the final render has it,
        else the part of it from a special token on (Qwen3 drops the think block of a history turn
        but keeps `<tool_call>`), else nothing (never the header's own newline)."""
        if not lead:
            return 0
        n = _lcs(full[:p], lead, min(p, len(lead)))
        if n == len(lead) or not self._added:
            return n if n == len(lead) else 0
        m = self._added.search(lead, len(lead) - n)
        return len(lead) - m.start() if m else 0

    @staticmethod
    def _verify(region: str, vregion: str, v: str, sentinels: list[tuple[str, str, str]], i: int) -> bool:
        """Check that `region` is `vregion` with the sentinels put back; True when reasoning was dropped."""
        dropped = False
        present = []
        for kind, sent, original in sentinels:
            n = v.count(sent)
            if kind == "reasoning" and n == 0:
                dropped = True
                continue
            if n == 0:
                raise TemplateMismatch(f"the template does not render the {_KINDS[kind]} of assistant turn {i}")
            if n > 1 or sent not in vregion:
                raise TemplateMismatch(f"the template renders the {_KINDS[kind]} of assistant turn {i} {n} times")
            present.append((kind, sent, original))
        if not present:
            raise TemplateMismatch(f"the template renders nothing of assistant turn {i}")
        pattern = re.compile("|".join(re.escape(s) for _, s, _ in present))
        regex = "".join(re.escape(part) if k % 2 == 0 else "(.*?)" for k, part in enumerate(_split(vregion, pattern)))
        m = re.fullmatch(regex, region, re.S)
        order = [next(x for x in present if x[1] == tok) for tok in pattern.findall(vregion)]
        if m is None:
            raise TemplateMismatch(f"assistant turn {i} renders differently around its content than its "
                                   "sentinel does, so its span is ambiguous")
        for (kind, _, original), got in zip(order, m.groups()):
            ok = (got == original if kind == "name" else got.strip() == original.strip() if kind == "reasoning"
                  else got.strip() in visible_content(original))
            if not ok:
                raise TemplateMismatch(f"the {kind} of assistant turn {i} is rendered as {got[:60]!r}, "
                                       f"not as given ({original[:60]!r})")
            if kind == "content" and got.strip() != original.strip():
                dropped = True  # the template cut an inline think block out of the content
        return dropped

    def _tail_len(self, full: str, end: int, tail: str) -> int:
        n = _lcp(full[end:end + len(tail)], tail, min(len(tail), len(full) - end)) if tail else 0
        for m in self._added.finditer(tail) if self._added else ():
            if m.start() < n < m.end():  # never stop inside a special token
                n = m.start()
                break
        if n == 0 and self._added and (m := self._added.match(full, end)):
            n = m.end() - end  # nothing in common: the turn's own end-of-turn token
        return n


def _split(text: str, pattern: re.Pattern) -> list[str]:
    """text split at the sentinels: literal, sentinel, literal, ... (sentinels at odd positions)."""
    out, pos = [], 0
    for m in pattern.finditer(text):
        out += [text[pos:m.start()], m.group()]
        pos = m.end()
    return out + [text[pos:]]
