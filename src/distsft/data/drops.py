"""Why examples were dropped: each reason with its count and the first few rows it hit.

"214 dropped" says nothing a user can act on; "214 dropped: longer than data.max_length=512
(data.overlong: drop), e.g. train.jsonl:3, train.jsonl:17" does. The build records the drops per
chunk (`count`), the chunks' records are merged in chunk order (`merge`), so the first rows named
are the first in the data whatever `data.num_proc` is. `prepare`, `plan`, the run's first lines and the
"too few rows" errors print them (`lines`, `explain`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

FIRST = 3  # rows named per reason

REASONS = {
    "overlong": "longer than data.max_length={max_length} (data.overlong: drop)",
    "no_loss": "no loss-carrying token within the first data.max_length={max_length} tokens (the answer was cut "
               "off by data.overlong: truncate{last})",
}


def count(mask: np.ndarray, wheres: list[str] | None) -> dict[str, Any]:
    """{count, first} for the examples where `mask` is true."""
    idx = np.flatnonzero(mask)
    first = [wheres[i] for i in idx[:FIRST]] if wheres is not None else []
    return {"count": int(idx.size), "first": first}


def merge(total: dict[str, dict], part: dict[str, dict]) -> dict[str, dict]:
    for reason, d in part.items():
        if not d["count"]:
            continue
        t = total.setdefault(reason, {"count": 0, "first": []})
        t["count"] += d["count"]
        t["first"] = (t["first"] + d["first"])[:FIRST]
    return total


def _reason(reason: str, max_length: int, assistant_turns: str) -> str:
    last = ("; data.assistant_turns: last trains on the final turn only, the one a cut removes first"
            if assistant_turns == "last" else "")
    return REASONS.get(reason, reason).format(max_length=max_length, last=last)


def lines(stats: dict, assistant_turns: str = "all") -> list[str]:
    """One line per drop reason: count, why, the first rows."""
    out = []
    for reason, d in (stats.get("drops") or {}).items():
        if d["count"]:
            rows = f"; e.g. {', '.join(d['first'])}" if d["first"] else ""
            out.append(f"{d['count']:,} dropped: {_reason(reason, stats.get('max_length', 0), assistant_turns)}{rows}")
    return out


def explain(stats: dict, assistant_turns: str = "all") -> str:
    """The drops as one clause for an error ("" when nothing was dropped)."""
    found = lines(stats, assistant_turns)
    if not found:
        return ""
    kept = stats.get("num_examples", 0)
    return (f" ({kept:,} of {kept + stats.get('num_dropped', 0):,} examples kept; " + "; ".join(found)
            + "; raise data.max_length or shorten the data)")


# What a template may leave out of a conversation, and what it means.
LEFT_OUT = {
    "system": "the system message (the model never sees it in training; Mistral-v0.3's template, for one, writes "
              "it into the last user turn only, which a training conversation ending in an answer does not have)",
    "tools": "the tools (their schemas are not in the rendered text)",
    "reasoning": "the reasoning of some assistant turns (it carries no loss)",
}


def dropped_parts(messages: list[dict], tools: Any, text: str, spans: list) -> list[str]:
    """Which of system message, tools and reasoning the rendered `text` does not contain."""
    out = []
    if any(m["role"] == "system" and isinstance(m.get("content"), str) and m["content"].strip()
           and m["content"].strip() not in text for m in messages):
        out.append("system")
    names = [t.get("function", t).get("name") for t in tools or () if isinstance(t, dict)]
    if names and not any(isinstance(n, str) and n in text for n in names):
        out.append("tools")
    if any(getattr(sp, "reasoning_dropped", False) for sp in spans):
        out.append("reasoning")
    return out


def left_out_lines(counts: dict[str, int], records: int, template: str) -> list[str]:
    """One warning per part the template left out, with its count."""
    return [f"data: the chat template ({template}) leaves out {LEFT_OUT.get(part, part)}: {n:,} of {records:,} "
            "conversations" for part, n in counts.items() if n]
