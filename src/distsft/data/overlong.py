"""data.overlong (truncate / drop) applied to one chunk of encoded examples, and the examples with
nothing left to learn dropped: the one rule both the parallel build and any in-memory encoding use."""

from __future__ import annotations

from typing import Any

import numpy as np


def apply_overlong(ids: np.ndarray, labels: np.ndarray, lens: np.ndarray, spec: Any,
                   wheres: list[str] | None = None) -> tuple[dict, dict]:
    """`wheres` (each example's file:line or name[row i]) names the first dropped rows in stats["drops"]."""
    from distsft.data.drops import count
    n, max_len = lens.size, spec.max_length
    starts = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
    # The first token of an example is never a target: in a packed row it would be predicted from the
    # previous example (templates start with BOS or a header anyway).
    labels[starts[lens > 0]] = -100
    over = lens > max_len
    too_long = over if spec.overlong == "drop" else np.zeros(n, dtype=bool)
    keep = ~too_long
    ex_of_tok = np.repeat(np.arange(n), lens)
    pos = np.arange(ids.size) - np.repeat(starts, lens)
    tok_keep = keep[ex_of_tok] & (pos < max_len)
    loss = np.bincount(ex_of_tok[tok_keep & (labels != -100)], minlength=n)
    no_loss = keep & (loss == 0)
    keep &= loss > 0  # nothing left to learn (e.g. the answer was cut off): drop
    tok_keep &= keep[ex_of_tok]
    new_lens = np.minimum(lens, max_len)[keep]
    stats = {"num_examples": int(keep.sum()), "num_dropped": int(n - keep.sum()),
             "num_truncated": int((over & keep).sum()) if spec.overlong == "truncate" else 0,
             "num_tokens": int(new_lens.sum()), "num_loss_tokens": int(loss[keep].sum()),
             "drops": {k: v for k, v in (("overlong", count(too_long, wheres)), ("no_loss", count(no_loss, wheres)))
                       if v["count"]}}
    return {"input_ids": ids[tok_keep], "labels": labels[tok_keep], "lengths": new_lens}, stats
