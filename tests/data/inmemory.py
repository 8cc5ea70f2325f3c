"""The in-memory encoding pipeline the tests compare the streaming build against: records loaded whole,
encoded in one process, overlong applied by the same rule (data.overlong). Test-only: the product
builds through data.build (streaming, parallel, spilled to disk)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from distsft.data.examples import Encoder
from distsft.data.formats import chat_messages, required_columns
from distsft.data.overlong import apply_overlong
from distsft.data.pack_write import histogram
from distsft.data.sources import iter_records
from distsft.errors import SpecError
from distsft.runtime.dist import warn

_CHUNK = 2048


def _data(spec: Any) -> Any:
    return getattr(spec, "data", spec)  # accept a RunSpec or its DataSpec


def _load(files: list[str], fmt: str, spec: Any, limit: int | None = None) -> tuple[list, Any]:
    """The raw `(where, record)` pairs of `files` and the DataSpec to read them with (`fmt` applied)."""
    spec = _data(spec)
    files = [files] if isinstance(files, (str, Path)) else files
    if fmt != spec.format:
        spec = spec.model_copy(update={"format": fmt})
    columns = required_columns(spec)
    pairs = []
    for name in files:
        for pair in iter_records(str(name), columns):
            pairs.append(pair)
            if limit and len(pairs) >= limit:
                return pairs, spec
    if not pairs:
        raise SpecError(f"no records in {', '.join(map(str, files))}")
    return pairs, spec


def load_records(files: list[str], fmt: str, spec: Any) -> Any:
    """A Dataset with `messages` (validated, system prompt applied) and `source` (file:line)."""
    from datasets import Dataset
    pairs, spec = _load(files, fmt, spec)
    return Dataset.from_dict({"messages": [chat_messages(rec, where, spec) for where, rec in pairs],
                              "source": [where for where, _ in pairs]})


def _tokenize_arrays(pairs: list, tokenizer: Any, spec: Any) -> tuple[dict, dict]:
    """Flat numpy token/label arrays and per-example lengths, after overlong handling."""
    if not pairs:
        raise SpecError("no conversations to tokenize")
    encoder = Encoder(tokenizer, spec)
    parts = [encoder(pairs[lo:lo + _CHUNK]) for lo in range(0, len(pairs), _CHUNK)]
    ids = np.concatenate([p.input_ids for p in parts])
    labels = np.concatenate([p.labels for p in parts])
    lens = np.concatenate([p.lengths for p in parts])
    for msg in sorted(set().union(*(p.warnings for p in parts))):
        warn(msg)
    return apply_overlong(ids, labels, lens, spec)


def _list_array(offsets: np.ndarray, values: np.ndarray) -> Any:
    import pyarrow as pa
    if offsets[-1] < 2**31 - 1:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values))
    return pa.LargeListArray.from_arrays(pa.array(offsets.astype(np.int64)), pa.array(values))


def _dataset(columns: dict[str, Any]) -> Any:
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable
    return Dataset(InMemoryTable(pa.table(columns)))


def _offsets(lens: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(lens))).astype(np.int64)


def tokenize(dataset: Any, tokenizer: Any, spec: Any) -> tuple[Any, dict]:
    """Columns input_ids, labels (-100 outside assistant turns), length; plus per-example stats."""
    spec = _data(spec)
    sources = dataset["source"] if "source" in dataset.column_names else [f"row {i}" for i in range(len(dataset))]
    # Re-validated by the encoder: the dataset may not come from load_records (e.g. Arrow's None-filled
    # struct keys).
    chat = spec.model_copy(update={"format": "messages", "messages_column": "messages"})
    pairs = [(src, {"messages": c}) for c, src in zip(dataset["messages"], sources)]
    tok, stats = _tokenize_arrays(pairs, tokenizer, chat)
    off = _offsets(tok["lengths"])
    ds = _dataset({"input_ids": _list_array(off, tok["input_ids"]), "labels": _list_array(off, tok["labels"]),
                   "length": tok["lengths"].astype(np.int32)})
    stats["length_histogram"] = histogram(tok["lengths"])
    return ds, stats
