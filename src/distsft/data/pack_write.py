"""Packing the spilled examples and writing the packed rows, in chunks, to one Arrow file.

Best-fit-decreasing needs the lengths only; the tokens stay on disk until their row is written, read
back example by example with `pread` (not a memory map: mapped pages would count as this process'
resident memory and grow with the data). Each eval set is packed on its own, so a row never mixes
sets, and its rows are contiguous (stats["eval_sets"][i]["rows"]).
"""

from __future__ import annotations

import os
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from distsft.data.drops import explain
from distsft.data.packing import pack_bfd
from distsft.errors import SpecError

_TOKENS_PER_BATCH = 1 << 22  # tokens per written record batch (~16 MB per column)


def _offsets(lens: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lens, dtype=np.int64))).astype(np.int64)


def histogram(lens: np.ndarray, bins: int = 50) -> dict:
    if lens.size == 0:
        return {"bin_edges": [], "counts": []}
    counts, edges = np.histogram(lens, bins=min(bins, max(1, int(lens.max() - lens.min()) or 1)))
    return {"bin_edges": [round(float(e), 2) for e in edges], "counts": counts.tolist()}


def _rows(lens: np.ndarray, max_len: int, packing: bool) -> tuple[np.ndarray, np.ndarray]:
    """(example order, examples per row) for one set."""
    bins = pack_bfd(lens, max_len) if packing else [[i] for i in range(lens.size)]
    order = np.fromiter(chain.from_iterable(bins), dtype=np.int64, count=lens.size)
    per_row = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    return order, per_row


def write_packed(spilled: Any, labels: list[str], d: Any, path: Path) -> dict:
    import pyarrow as pa
    lens_all, max_len = spilled.lengths.astype(np.int64), d.max_length
    starts = _offsets(lens_all)[:-1]
    orders, per_rows, sets = [], [], []
    for i, label in enumerate(labels):
        idx = np.flatnonzero(spilled.set_of == i)  # contiguous: sets are encoded one after the other
        if idx.size == 0:
            what = "the training data" if labels == ["train"] else f"eval set {label!r}"
            why = explain({**spilled.stats, "max_length": max_len}, d.assistant_turns)
            raise SpecError(f"no examples left in {what}{why}" if why else f"no examples in {what}")
        order, per_row = _rows(lens_all[idx], max_len, d.packing)
        row0 = sum(int(p.size) for p in per_rows)
        orders.append(idx[order])
        per_rows.append(per_row)
        n_tok = int(lens_all[idx].sum())
        sets.append({"label": label, "examples": int(idx.size), "tokens": n_tok, "rows": [row0, row0 + int(per_row.size)]})
    order, per_row = np.concatenate(orders), np.concatenate(per_rows)
    row_start = _offsets(per_row)  # example offset of each row
    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32())),
                        ("seq_lengths", pa.list_(pa.int32())),
                        # per example, parallel to seq_lengths: the source it came from (loss_<label>)
                        ("source_ids", pa.list_(pa.int32()))])
    source_of = spilled.source_of if spilled.source_of is not None else np.zeros(lens_all.size, dtype=np.int32)
    rows_per_batch = max(1, _TOKENS_PER_BATCH // max_len)
    with open(spilled.ids_path, "rb") as fi, open(spilled.labels_path, "rb") as fl, \
            pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for r0 in range(0, per_row.size, rows_per_batch):
            r1 = min(per_row.size, r0 + rows_per_batch)
            ex = order[row_start[r0]:row_start[r1]]
            seq = lens_all[ex]
            ids = _gather(fi.fileno(), starts[ex], seq)
            lab = _gather(fl.fileno(), starts[ex], seq)
            tok_off = _offsets(seq)[row_start[r0:r1 + 1] - row_start[r0]]
            ex_off = row_start[r0:r1 + 1] - row_start[r0]
            writer.write_batch(pa.record_batch([
                pa.ListArray.from_arrays(pa.array(tok_off.astype(np.int32)), pa.array(ids)),
                pa.ListArray.from_arrays(pa.array(tok_off.astype(np.int32)), pa.array(lab)),
                pa.ListArray.from_arrays(pa.array(ex_off.astype(np.int32)), pa.array(seq.astype(np.int32))),
                pa.ListArray.from_arrays(pa.array(ex_off.astype(np.int32)), pa.array(source_of[ex].astype(np.int32)))],
                schema=schema))
    st = spilled.stats
    kept = lens_all
    n_rows = int(per_row.size)
    stats = {**st, "num_rows": n_rows, "max_length": max_len, "packing": bool(d.packing),
             "packing_efficiency": round(st["num_tokens"] / (n_rows * max_len), 6),
             "lower_bound_rows": int(sum(-(-s["tokens"] // max_len) for s in sets)),
             "mean_length": round(float(kept.mean()), 2), "max_example_length": int(kept.max()),
             "length_histogram": histogram(kept)}
    if labels != ["train"]:
        stats["eval_sets"] = sets
    return stats


def _gather(fd: int, starts: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """The int32 runs [start, start + len) of a flat file, concatenated."""
    out = np.empty(int(lens.sum()), dtype=np.int32)
    view = memoryview(out).cast("B")
    pos = 0
    for s, n in zip(starts.tolist(), lens.tolist()):
        nbytes = 4 * n
        got = os.preadv(fd, [view[pos:pos + nbytes]], 4 * s)
        if got != nbytes:
            raise OSError(f"short read from the token spill file ({got} of {nbytes} bytes)")
        pos += nbytes
    return out
