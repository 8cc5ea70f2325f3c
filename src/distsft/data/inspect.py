"""What `distsft sanity` shows and checks of the loss mask, on the first records of the training data:
the rendered text with the loss-carrying characters marked, and for each labelled turn that its span
holds the turn's answer and ends where the answer ends (only end-of-turn text after it). The spans
are also located a second, independent way (differential rendering on every turn) and compared."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from distsft.data.chat import ChatRenderer
from distsft.data.turns import visible_content
from distsft.data.encode import label_mask
from distsft.data.examples import Encoder, Rendered


def _char_mask(enc: Encoder, r: Rendered) -> tuple[np.ndarray, int]:
    """Which characters of r.text belong to a loss-carrying token, and the number of such tokens."""
    ids, starts, ends, lens = enc.enc.encode([r.text], [r.spans])
    sp = np.array(r.spans, dtype=np.int64).reshape(-1, 2)
    mask = label_mask(starts, ends, lens, np.array([len(r.text)]), sp[:, 0], sp[:, 1], np.array([len(sp)]))
    chars = np.zeros(len(r.text), dtype=bool)
    for s, e in zip(starts[mask], ends[mask]):
        chars[s:max(e, s + 1)] = True
    return chars, int(mask.sum())


def marked_text(text: str, chars: np.ndarray, open_: str = "[[", close: str = "]]") -> str:
    out, inside = [], False
    for c, m in zip(text, chars.tolist()):
        if m != inside:
            out.append(open_ if m else close)
            inside = m
        out.append(c)
    return "".join(out) + (close if inside else "")


def _end_ok(renderer: ChatRenderer, text: str, turn: dict) -> str | None:
    """None when `text` (a turn's labelled span) holds its answer and only end-of-turn text follows it."""
    if turn.get("tool_calls"):
        names = [tc.get("function", tc).get("name", "") for tc in turn["tool_calls"]]
        return None if all(n in text for n in names) else f"tool call {names} not in the labelled span"
    answers = [v for v in visible_content(turn.get("content") or "") if v]
    if not answers:
        return None
    for ans in answers:
        k = text.rfind(ans)
        if k < 0 and len(text.lower()) == len(text):  # a template that lower-cases a tag in the answer
            k = text.lower().rfind(ans.lower())
        if k >= 0:
            rest = text[k + len(ans):]
            if renderer.added is not None:
                rest = renderer.added.sub("", rest)
            return None if not rest.strip() else f"text after the answer in its span: {rest.strip()[:40]!r}"
    return f"the answer {answers[0][:40]!r} is not in its labelled span"


def check_records(tokenizer: Any, spec: Any, pairs: list[tuple[str, Any]], show: Any = print,
                  mapping: Any = None, source: str | None = None, first: int = 0) -> list[tuple[str, str]]:
    """Verdicts (PASS/WARN/FAIL, message) for the records `pairs` (of `source`, read with `mapping`);
    each example is shown marked, numbered from `first` + 1."""
    enc = Encoder(tokenizer, spec, mapping)
    cross = None
    if enc.renderer is not None:
        # The other method: differential rendering, on the template without its markers if it has them
        # (each tag becomes an `if true` block with the same whitespace control).
        plain = re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", enc.renderer.template)
        plain = re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", plain)
        cross = ChatRenderer(tokenizer, plain)
    results: list[tuple[str, str]] = []
    shown = first
    for where, rec in pairs:
        rendered = enc.render(where, rec)
        others = _diff_render(enc, cross, where, rec) if cross is not None else None
        for j, r in enumerate(rendered):
            shown += 1
            chars, n_loss = _char_mask(enc, r)
            show(f"example {shown} ({source + ', ' if source else ''}{where}):\n{marked_text(r.text, chars)}")
            if r.spans and (after := r.text[r.spans[-1][1]:]).strip():
                # e.g. a generation prompt the template writes after the last message: shown unmarked above
                show(f"  after the last labelled span, carrying no loss: {after!r}")
            if n_loss == 0:
                results.append(("FAIL", f"{where}: example {shown} has no token carrying loss"))
                continue
            for k, ((s, e), turn) in enumerate(zip(r.spans, r.turns)):
                if problem := _end_ok(enc.renderer, r.text[s:e], turn):
                    results.append(("FAIL", f"{where}: labelled span {k + 1} does not end where its turn's "
                                            f"answer ends ({problem})"))
            if others is not None and r.turns and others[j].spans != r.spans:
                a = [r.text[s:e] for s, e in r.spans]
                b = [others[j].text[s:e] for s, e in others[j].spans]
                ends = [len(r.text[:e].rstrip()) for _, e in r.spans]
                if others[j].text == r.text and ends != [len(r.text[:e].rstrip()) for _, e in others[j].spans]:
                    results.append(("FAIL", f"{where}: a labelled span does not end where its turn's answer "
                                            f"ends (labelled {a!r}; differential rendering locates {b!r})"))
                else:  # e.g. a template's own markers leave out the space before the answer
                    results.append(("WARN", f"{where}: the loss spans start differently by the two methods: "
                                            f"{a!r} vs {b!r}"))
    return results


def _diff_render(enc: Encoder, cross: ChatRenderer, where: str, rec: Any) -> list[Rendered] | None:
    saved = enc.renderer
    try:
        enc.renderer = cross
        return enc.render(where, rec, method="diff")
    except Exception:  # the strict method refuses where the other one is exact: nothing to compare
        return None
    finally:
        enc.renderer = saved
