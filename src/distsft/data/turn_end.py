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

`turn_end_token` and `turn_end_warning` are for plan and sanity: the token that ends assistant turns,
and a warning when it is neither the tokenizer's eos_token nor in the model's
generation_config.eos_token_id (the fine-tuned model would not stop where its template ends turns).
"""

from __future__ import annotations

import re
from typing import Any

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


# ---------------------------------------------------------------------------- the end-of-turn token

PROBES = ([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
          [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
           {"role": "assistant", "content": "Hello"}])


def turn_end_token(tokenizer: Any, template: str) -> str | None:
    """The special token that ends an assistant turn in `template` (the last one of the turn's
    labelled span on a probe conversation), or None (no template, no special token, or it refuses)."""
    from distsft.data.chat import ChatRenderer
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
