"""Which data source every token of a collated batch came from, for per-source losses (`loss_<label>`).

The packed cache stores one source index per example (`source_ids`, parallel to `seq_lengths`: a row
may pack examples of several sources); here they become one id per token position of the batch the
collator built ([rows, width], or [1, total] when flash attention concatenates the rows), -1 on
padding. `token_mask` marks real tokens (not padding): the router's load-balancing loss counts those.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def token_sources(rows: list[dict[str, Any]], shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(source_ids [B, W] int64, token_mask [B, W] bool) for rows collated into `shape`."""
    per_row = []
    for r in rows:
        seq = np.asarray(r["seq_lengths"], dtype=np.int64)
        src = np.asarray(r["source_ids"], dtype=np.int64) if "source_ids" in r else np.zeros(seq.size, np.int64)
        per_row.append(np.repeat(src, seq))
    if shape[0] == 1 and len(per_row) > 1:  # flash attention: rows concatenated into one sequence
        per_row = [np.concatenate(per_row)]
    out = np.full(shape, -1, dtype=np.int64)
    for b, ids in enumerate(per_row):
        out[b, :ids.size] = ids
    ids = torch.from_numpy(out)
    return ids, ids >= 0
