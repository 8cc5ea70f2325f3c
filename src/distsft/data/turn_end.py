"""Where an assistant turn ends, and the text after the last message that belongs to no message.

A template may write text after the last message: a generation prompt written whatever
`add_generation_prompt` says (Meta-Llama-3-8B-Instruct as first released), a final suffix (Phi-3's
`eos_token`). It belongs to no message and never carries loss. The last assistant turn's own end
keeps the convention of every other turn: its end-of-turn token and the whitespace written right
after it (`<|eot_id|>`, `<|im_end|>\\n`, `<|end|>\\n`, `</s>`).

`turn_end` splits what the template writes after the last turn's content (`tail`) into the two, from
two other renders: one whose last message is another one (`other`: text it shares at the end with
`tail` may be written after any message) and, when it can be had, the same conversation followed by
one more message (`followed`: what the template writes after the turn when it is not the last).
Where the turn has no end-of-turn token of its own before that text, or its token is glued to the
trailing text (a header token opening the dangling prompt), the end cannot be told: `TemplateMismatch`.

The token that ends assistant turns, checked against the tokenizer's eos for plan and sanity, is
train.stops' (it renders a probe conversation through data.chat, which builds on this module).
"""

from __future__ import annotations

import re

from distsft.data.turns import TemplateMismatch


def _lcp(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[k] == b[k]:
        k += 1
    return k


def _lcs(a: str, b: str) -> int:
    n = min(len(a), len(b))
    k = 0
    while k < n and a[len(a) - 1 - k] == b[len(b) - 1 - k]:
        k += 1
    return k


def _snap_back(text: str, pos: int, added: re.Pattern | None) -> int:
    """pos moved back to the start of the special token it is inside of, if any."""
    for m in added.finditer(text) if added else ():
        if m.start() < pos < m.end():
            return m.start()
        if m.start() >= pos:
            break
    return pos


def _snap_forward(text: str, pos: int, added: re.Pattern | None) -> int:
    for m in added.finditer(text) if added else ():
        if m.start() < pos < m.end():
            return m.end()
        if m.start() >= pos:
            break
    return pos


def shared_end(tail: str, other: str | None, added: re.Pattern | None) -> int:
    """Length of the end of `tail` that `other` ends with too, starting on a token boundary."""
    if not other:
        return 0
    n = _lcs(tail, other)
    return len(tail) - _snap_forward(tail, len(tail) - n, added)


def turn_end(tail: str, other: str | None, followed: str | None, added: re.Pattern | None) -> int:
    """How much of `tail` (what the template writes after the last message's content, to the end
    of the render) is the turn's own end; the rest is text after the last message, carrying no loss."""
    if not tail:
        return 0
    common = shared_end(tail, other, added)
    if common == 0:  # nothing of it is also written after another message: all the turn's
        return len(tail)
    if followed is not None:
        # The turn's end is what it writes also when another message follows, up to where that
        # message starts: not a special token glued to the role that follows it (the header token
        # `<|start_header_id|>`, `<|im_start|>` that opens both the next message and the trailing prompt).
        agree = _snap_back(tail, _lcp(tail, followed), added)
        if agree >= len(tail):  # the turn writes all of it also when another message follows
            return len(tail)
        k = agree
        last = _last_token(tail, k, added)
        if last is not None and last.end() == k and _glued(tail[k:], added) and _glued(followed[k:], added):
            k = last.start()
    else:  # unknown (the template cannot render one more message): the first special token ends the turn
        first = added.search(tail) if added else None
        k = first.end() if first else 0
        while first and k < len(tail) and tail[k].isspace():  # ChatML's "\n" after <|im_end|>
            k += 1
    k = max(k, len(tail) - common)
    if k >= len(tail):
        return len(tail)
    rest = tail[k:]
    own = _last_token(tail, k, added)
    if own is None:
        raise TemplateMismatch(f"where the last assistant turn ends cannot be told: it has no end-of-turn token "
                               f"before the text the template writes after the last message ({rest[:40]!r})")
    if own.end() == k and _glued(rest, added):
        raise TemplateMismatch(f"where the last assistant turn ends cannot be told: its last special token "
                               f"{own.group()!r} opens the text the template writes after the last message "
                               f"({tail[own.start():][:40]!r})")
    return k


def _last_token(text: str, end: int, added: re.Pattern | None) -> re.Match | None:
    last = None
    for m in added.finditer(text, 0, end) if added else ():
        last = m
    return last


def _glued(rest: str, added: re.Pattern | None) -> bool:
    """Whether `rest` goes on with plain text (a role name), not whitespace or another special token."""
    return bool(rest) and not rest[0].isspace() and not (added and added.match(rest))
