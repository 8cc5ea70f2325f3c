"""Differential rendering: an assistant turn's span in a template that is not prefix-stable.

The conversation is rendered again with turn i's content, reasoning and tool-call names replaced by
unique sentinels; the stretch where the two renders differ is turn i's text in the final render. It
is accepted only when it equals the variant's stretch with each sentinel put back (modulo the
template's stripping), each sentinel appearing exactly once; then it is extended over the text the
template writes around the content when the turn is the last one (the part after the generation
prompt, e.g. Mistral's space, and the end-of-turn text). Anything else is a `TemplateMismatch`.
"""

from __future__ import annotations

import re
from typing import Any

from distsft.data.turn_end import turn_end
from distsft.data.turns import (REASONING_FIELDS, Renderer, Span, TemplateMismatch, normalized, reasoning_of,
                                visible_content)

_KINDS = {"content": "content", "reasoning": "reasoning", "name": "tool calls"}


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


def _variant(r: Renderer, messages: list[dict], i: int, taken: str) -> tuple[list[dict], list[tuple[str, str, str]]]:
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

def diff_span(r: Renderer, full: str, messages: list[dict], i: int, tools: Any, extra: dict | None) -> Span:
    variant, sentinels = _variant(r, messages, i, full)
    if not sentinels:
        raise TemplateMismatch(f"assistant turn {i} has no content, reasoning or tool calls to locate")
    try:
        v = r.render(variant, False, tools, extra)
    except Exception as exc:
        raise TemplateMismatch(f"the template cannot render assistant turn {i} with its content replaced "
                               f"({type(exc).__name__}: {exc})") from None
    p, s = _diff(full, v)
    region, vregion = full[p:len(full) - s], v[p:len(v) - s]
    dropped = _verify(region, vregion, v, sentinels, i)
    # The text the template writes around the content when this turn is the last one: the part
    # after it (end-of-turn) as far as the final render agrees, the part before it (after the
    # generation prompt, e.g. Mistral's space) where the final render has it.
    last = i == len(messages) - 1
    thru = full if last else r.try_render(messages[: i + 1], False, tools, extra)
    tail = ""
    if thru is not None:
        try:
            ts = s if last else _diff(thru, r.render(variant[: i + 1], False, tools, extra))[1]
        except Exception:
            ts = 0
        tail = thru[len(thru) - ts:]
        if not last:  # what the turn writes as the last message, less what follows any last message:
            try:      # `full` is a render whose last message is another one
                tail = tail[:turn_end(tail, full, full[len(full) - s:], r.added)]
            except TemplateMismatch:
                pass  # the next message bounds it here
    if dropped:  # measure the lead on the turn as the final render shows it: without its reasoning
        messages, variant = ([*m[:i], {k: x for k, x in m[i].items() if k not in REASONING_FIELDS}, *m[i + 1:]]
                             for m in (messages, variant))
    start = p - _lead_len(r, full, p, _lead(r, messages, variant, i, tools, extra))
    end = len(full) - s
    return r.close(full, Span(i, start, end + _tail_len(r, full, end, tail), dropped))

def content_end(r: Renderer, full: str, messages: list[dict], i: int, tools: Any, extra: dict | None
                ) -> int | None:
    """Where turn i's own text (content, reasoning, tool-call names) ends in `full`: where `full` and
    the render with them replaced by sentinels stop differing; None when it cannot be had."""
    variant, sentinels = _variant(r, messages, i, full)
    if not sentinels:
        return None
    try:
        v = r.render(variant, False, tools, extra)
    except Exception:  # noqa: BLE001 - then the span stays as found
        return None
    return len(full) - _diff(full, v)[1]


def _lead(r: Renderer, messages: list[dict], variant: list[dict], i: int, tools: Any, extra: dict | None) -> str:
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
        pre = r.try_render(msgs[:-1], True, tools, extra)
        thru = r.try_render(msgs, False, tools, extra)
        if pre is None or thru is None:
            continue
        start = len(pre) if thru.startswith(pre) else None
        if start is None:
            # The turn departs from the generation prompt inside it (Nemotron: the prompt opens a
            # think block that the rendered turn writes empty): the lead starts where they part.
            # Parting earlier (Mistral's system message) is no lead at all.
            bare = r.try_render(msgs[:-1], False, tools, extra)
            start = _lcp(pre, thru, min(len(pre), len(thru)))
            if bare is None or not pre.startswith(bare) or start < len(bare):
                continue
        v = r.try_render([variant[k] for k in idx], False, tools, extra)
        if v is None:
            continue
        tp = _diff(thru, v)[0]
        if tp >= start:
            return thru[start:tp]
    return ""

def _lead_len(r: Renderer, full: str, p: int, lead: str) -> int:
    """How far the span extends before the content: all of `lead` when the final render has it,
    else the part of it from a special token on (Qwen3 drops the think block of a history turn
    but keeps `<tool_call>`), else nothing (never the header's own newline)."""
    if not lead:
        return 0
    n = _lcs(full[:p], lead, min(p, len(lead)))
    if n == len(lead) or not r.added:
        return n if n == len(lead) else 0
    m = r.added.search(lead, len(lead) - n)
    return len(lead) - m.start() if m else 0

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
              else any(normalized(got) == normalized(v) for v in visible_content(original)))
        if not ok:
            raise TemplateMismatch(f"the {kind} of assistant turn {i} is rendered as {got[:60]!r}, "
                                   f"not as given ({original[:60]!r})")
        if kind == "content" and normalized(got) != normalized(original):
            dropped = True  # the template cut an inline think block out of the content
    return dropped

def _tail_len(r: Renderer, full: str, end: int, tail: str) -> int:
    n = _lcp(full[end:end + len(tail)], tail, min(len(tail), len(full) - end)) if tail else 0
    for m in r.added.finditer(tail) if r.added else ():
        if m.start() < n < m.end():  # never stop inside a special token
            n = m.start()
            break
    if n == 0 and r.added and (m := r.added.match(full, end)):
        # Nothing in common (the turn ends differently as the last one): its own end-of-turn token
        # here, and the whitespace written right after it.
        rest = full[m.end():]
        n = m.end() - end + len(rest) - len(rest.lstrip())
    return n


def _split(text: str, pattern: re.Pattern) -> list[str]:
    """text split at the sentinels: literal, sentinel, literal, ... (sentinels at odd positions)."""
    out, pos = [], 0
    for m in pattern.finditer(text):
        out += [text[pos:m.start()], m.group()]
        pos = m.end()
    return out + [text[pos:]]
