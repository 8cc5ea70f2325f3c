"""Data: load -> chat template -> tokenize with assistant-only labels -> pack -> Arrow cache + stats.

Every user mistake (missing file, bad JSON line, wrong column or role, empty answer) becomes one
`SpecError` naming the file and line/row. `prepare` does the work once per (data, tokenizer, settings)
and caches the packed result with `save_to_disk`; later runs and other ranks memory-map it.
"""

from __future__ import annotations

import json
import os
import shutil
from itertools import chain
from pathlib import Path
from typing import Any

import numpy as np

from distsft.data.cache import DATA_FILE, cache_key, default_cache_root, load_cached, remember
from distsft.data.examples import Encoder
from distsft.data.formats import _conversation, required_columns
from distsft.data.pack_write import histogram
from distsft.data.packing import pack_bfd
from distsft.data.sources import iter_records
from distsft.dist import warn
from distsft.spec import SpecError

_CHUNK = 2048  # records per chunk (a worker task): bounds the tokenizer's Encoding objects, ~150 MB at 385 tokens


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
    return Dataset.from_dict({"messages": [_conversation(rec, where, spec) for where, rec in pairs],
                              "source": [where for where, _ in pairs]})


# --------------------------------------------------------------------------- tokenize and mask

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
    return _apply_overlong(ids, labels, lens, spec)


def _apply_overlong(ids: np.ndarray, labels: np.ndarray, lens: np.ndarray, spec: Any) -> tuple[dict, dict]:
    n, max_len = lens.size, spec.max_length
    starts = np.concatenate(([0], np.cumsum(lens)[:-1])).astype(np.int64)
    # The first token of an example is never a target: in a packed row it would be predicted from the
    # previous example (templates start with BOS or a header anyway).
    labels[starts[lens > 0]] = -100
    over = lens > max_len
    keep = ~over if spec.overlong == "drop" else np.ones(n, dtype=bool)
    ex_of_tok = np.repeat(np.arange(n), lens)
    pos = np.arange(ids.size) - np.repeat(starts, lens)
    tok_keep = keep[ex_of_tok] & (pos < max_len)
    loss = np.bincount(ex_of_tok[tok_keep & (labels != -100)], minlength=n)
    keep &= loss > 0  # nothing left to learn (e.g. the answer was cut off): drop
    tok_keep &= keep[ex_of_tok]
    new_lens = np.minimum(lens, max_len)[keep]
    stats = {"num_examples": int(keep.sum()), "num_dropped": int(n - keep.sum()),
             "num_truncated": int((over & keep).sum()) if spec.overlong == "truncate" else 0,
             "num_tokens": int(new_lens.sum()), "num_loss_tokens": int(loss[keep].sum())}
    return {"input_ids": ids[tok_keep], "labels": labels[tok_keep], "lengths": new_lens}, stats


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


def _pack(tok: dict, stats: dict, spec: Any) -> tuple[Any, dict]:
    lens, max_len = tok["lengths"], spec.max_length
    if lens.size == 0:
        raise SpecError(f"no examples left: all {stats['num_dropped']} were longer than data.max_length="
                        f"{max_len} (data.overlong={spec.overlong}) or had no assistant tokens left")
    bins = pack_bfd(lens, max_len) if spec.packing else [[i] for i in range(lens.size)]
    order = np.fromiter(chain.from_iterable(bins), dtype=np.int64, count=lens.size)
    per_row = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    src_start = _offsets(lens)[:-1][order]
    seq = lens[order]
    dst_start = _offsets(seq)[:-1]
    gather = np.repeat(src_start - dst_start, seq) + np.arange(int(seq.sum()))
    row_off = _offsets(seq)[_offsets(per_row)]  # token offset of each row
    ds = _dataset({"input_ids": _list_array(row_off, tok["input_ids"][gather]),
                   "labels": _list_array(row_off, tok["labels"][gather]),
                   "seq_lengths": _list_array(_offsets(per_row), seq.astype(np.int32))})
    n_rows = len(bins)
    stats = {**stats, "num_rows": n_rows, "max_length": max_len, "packing": bool(spec.packing),
             "packing_efficiency": round(stats["num_tokens"] / (n_rows * max_len), 6),
             "lower_bound_rows": int(-(-stats["num_tokens"] // max_len)),
             "mean_length": round(float(lens.mean()), 2), "max_example_length": int(lens.max()),
             "length_histogram": histogram(lens)}
    return ds, stats


# --------------------------------------------------------------------------- the streaming build

def _source_spec(d: Any, src: Any) -> Any:
    return d.model_copy(update={"format": src.spec.format}) if src.spec.format and src.spec.format != d.format else d


def _reader(d: Any, src: Any) -> Any:
    from distsft.data.sources import Reader
    sd = _source_spec(d, src)
    renamed = {new: old for new, old in src.spec.columns.items()}
    cols = [renamed.get(c, c) for c in required_columns(sd)]
    return sd, Reader(src.spec.path, src.name, cols, split=src.spec.split, subset=src.spec.subset,
                      revision=src.spec.revision, chunk=_CHUNK)


def open_streams(spec: Any, split: str) -> tuple[list[Any], list[str]]:
    """The streams a split reads (each source opened and checked, its selection drawn) and the labels
    of its sets (["train"], or one per eval set)."""
    from distsft.data import mixture
    from distsft.data.parallel import Stream
    d, seed = _data(spec), mixture.seed_of(spec)

    def training() -> list[Any]:
        out = []
        for src in mixture.train_sources(spec):
            sd, reader = _reader(d, src)
            out.append(Stream(src.name, reader, sd, dict(src.spec.columns), mixture.select(len(reader), src, seed, "train")))
        return out

    if split == "train":
        streams = training()
        if d.val_set_size:
            mults, _ = mixture.hold_out([s.mult for s in streams], [len(s.reader) for s in streams],
                                        d.val_set_size, seed, [s.name for s in streams])
            for s, m in zip(streams, mults):
                s.mult = m
        limit = getattr(d, "max_train_examples", None)
        if limit:
            for s in streams:
                m = s.mult if s.mult is not None else np.ones(len(s.reader), dtype=np.uint32)
                keep = np.clip(limit - (np.cumsum(m, dtype=np.int64) - m), 0, None)
                s.mult = np.minimum(m, keep).astype(np.uint32)
                limit = max(0, limit - int(m.sum()))
        return streams, ["train"]
    streams, labels = [], []
    for i, es in enumerate(mixture.eval_sets(spec)):
        labels.append(es.label)
        if es.val:
            train = training()
            _, masks = mixture.hold_out([s.mult for s in train], [len(s.reader) for s in train],
                                        d.val_set_size, seed, [s.name for s in train])
            for s, mask in zip(train, masks):
                s.mult, s.set_index = mask.astype(np.uint32), i
                streams.append(s)
            continue
        for src in es.sources:
            sd, reader = _reader(d, src)
            streams.append(Stream(src.name, reader, sd, dict(src.spec.columns),
                                  mixture.select(len(reader), src, seed, "eval"), set_index=i))
    if not streams:
        raise SpecError("no eval set: set data.eval_files, data.eval_sources or data.val_set_size")
    return streams, labels


def sample_records(spec: Any, n: int) -> tuple[list, Any]:
    """The first `n` records of the first training source (columns renamed) and its DataSpec."""
    from distsft.data.parallel import _rename
    from distsft.data.sources import chunk_records
    s = open_streams(spec, "train")[0][0]
    chunk = next(s.reader.chunks())
    return _rename(chunk_records(chunk)[:n], s.columns, s.name), s.spec


def build(spec: Any, tokenizer: Any, split: str, cache_root: str | Path) -> tuple[Any, dict]:
    """Read, encode (in data.num_proc processes), spill, pack and write one split's cache directory."""
    import tempfile
    from distsft.data.parallel import default_num_proc, encode_streams
    from distsft.data.pack_write import write_packed
    from distsft.data.progress import BuildProgress
    d = _data(spec)
    key = cache_key(spec, tokenizer, split)
    streams, labels = open_streams(spec, split)
    root = Path(cache_root)
    root.mkdir(parents=True, exist_ok=True)
    # mkdtemp: unique per host and process even on a shared file system (a pid alone is not).
    spill = Path(tempfile.mkdtemp(prefix=f".{key}.tokens-", dir=root))
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=root))
    try:
        total = sum(s.selected() for s in streams)
        with BuildProgress(total, f"{split} data") as bar:
            spilled = encode_streams(streams, tokenizer, d.num_proc or default_num_proc(), spill, bar)
        for w in sorted(spilled.warnings):
            warn(w)
        stats = write_packed(spilled, labels, d, tmp / DATA_FILE)
        if split == "train":
            stats["sources"] = [{"path": s.reader.path, "subset": s.reader.subset, "split": s.reader.split,
                                 "examples": s.examples} for s in streams]
        (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
        try:
            os.rename(tmp, root / key)  # atomic: readers never see a half-written cache
        except OSError:  # another process finished first; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    cached = load_cached(root, key)
    assert cached is not None
    return cached


def prepare(spec: Any, tokenizer: Any, split: str, cache_root: str | Path) -> tuple[Any, dict]:
    """The packed split from the cache, building it first when needed."""
    key = cache_key(spec, tokenizer, split)
    found = load_cached(cache_root, key) or build(spec, tokenizer, split, cache_root)
    remember(spec, split, cache_root, key)
    return found


def summarize(spec: Any, tokenizer: Any, split: str = "train") -> dict:
    """Stats for `distsft plan`, sharing the training cache."""
    return prepare(spec, tokenizer, split, default_cache_root(spec))[1]
