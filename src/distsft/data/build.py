"""The streaming build of one split's cache: sources opened and selected (mixture), records encoded in
data.num_proc processes (parallel), tokens spilled to disk, packed and written in chunks (pack_write).

Every user mistake (missing file, bad JSON line, wrong column or role, empty answer) becomes one
`SpecError` naming the file and line/row. `load_or_build` does the work once per (data, tokenizer,
settings); later runs and other ranks memory-map the cache.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from distsft.data.cache import DATA_FILE, cache_key, load_cached, remember
from distsft.data.formats import required_columns
from distsft.errors import SpecError
from distsft.runtime.dist import warn

_CHUNK = 2048  # records per chunk (a worker task): bounds the tokenizer's Encoding objects, ~150 MB at 385 tokens


def _data(spec: Any) -> Any:
    return getattr(spec, "data", spec)  # accept a RunSpec or its DataSpec


# --------------------------------------------------------------------------- the streaming build

def _source_spec(d: Any, src: Any) -> Any:
    return d.model_copy(update={"format": src.spec.format}) if src.spec.format and src.spec.format != d.format else d


def _reader(d: Any, src: Any) -> Any:
    from distsft.data.sources import Reader
    sd = _source_spec(d, src)
    mapping = peer_mapping(src)
    if mapping is not None:  # its columns are the peer's names: the mapping reads them
        cols = ([mapping.messages] if hasattr(mapping, "messages") else [mapping.prompt, mapping.response])
        cols += [c for c in mapping.required if c not in cols]
    else:
        renamed = {new: old for new, old in src.spec.columns.items()}
        cols = [renamed.get(c, c) for c in required_columns(sd)]
    return sd, Reader(src.spec.path, src.name, cols, split=src.spec.split, subset=src.spec.subset,
                      revision=src.spec.revision, chunk=_CHUNK)


def peer_mapping(src: Any) -> Any:
    """The data/peers.py mapping of a source described the LLaMA-Factory or axolotl way, else None."""
    from distsft.config.peers import is_axolotl, is_lf
    from distsft.data.peers import mapping_for
    return mapping_for(src.spec, None, src.name) if is_lf(src.spec) or is_axolotl(src.spec) else None


def _stream(d: Any, src: Any, mult_of: Any, **kw: Any) -> Any:
    from distsft.data.parallel import Stream
    sd, reader = _reader(d, src)
    mapping = peer_mapping(src)
    return Stream(src.name, reader, sd, {} if mapping is not None else dict(src.spec.columns), mult_of(reader),
                  mapping=mapping, **kw)


def open_streams(spec: Any, split: str) -> tuple[list[Any], list[str]]:
    """The streams a split reads (each source opened and checked, its selection drawn) and the labels
    of its sets (["train"], or one per eval set)."""
    from distsft.data import mixture
    d, seed = _data(spec), mixture.seed_of(spec)

    def training() -> list[Any]:
        out = []
        for src in mixture.train_sources(spec):
            out.append(_stream(d, src, lambda r, src=src: mixture.select(len(r), src, seed, "train")))
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
            streams.append(_stream(d, src, lambda r, src=src: mixture.select(len(r), src, seed, "eval"), set_index=i))
    if not streams:
        raise SpecError("no eval set: set data.eval_files, data.eval_sources or data.val_set_size")
    return streams, labels


def sample_records(spec: Any, n: int) -> list[tuple[str, list, Any, Any]]:
    """About `n` records drawn from every training source (at least one each, from its first chunk,
    seeded by train.seed): (source name, (where, record) pairs with columns renamed, its DataSpec,
    its mapping)."""
    from distsft.data import mixture
    from distsft.data.parallel import rename_columns
    from distsft.data.sources import chunk_records
    streams = open_streams(spec, "train")[0]
    per = max(1, -(-n // len(streams)))
    rng = np.random.default_rng(mixture.seed_of(spec))
    out = []
    for s in streams:
        pairs = chunk_records(next(s.reader.chunks()))
        pick = sorted(rng.choice(len(pairs), min(per, len(pairs)), replace=False).tolist())
        out.append((s.name, rename_columns([pairs[i] for i in pick], s.columns, s.name), s.spec, s.mapping))
    return out


def build(spec: Any, tokenizer: Any, split: str, cache_root: str | Path) -> tuple[Any, dict]:
    """Read, encode (in data.num_proc processes), spill, pack and write one split's cache directory."""
    import tempfile
    from distsft.data.parallel import default_num_proc, encode_streams
    from distsft.data.pack_write import write_packed
    from distsft.observe.progress import BuildProgress
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
        from distsft.data.drops import left_out_lines
        from distsft.data.templates import resolve as resolve_template
        origin = resolve_template(tokenizer, d.chat_template).origin
        for w in left_out_lines(spilled.stats["template_drops"], total, origin):
            warn(w)
        stats = write_packed(spilled, labels, d, tmp / DATA_FILE)
        from distsft.data.drops import explain, lines
        stats["drop_lines"] = lines(stats, d.assistant_turns)  # said by prepare, plan and the run's first lines
        stats["drops_explained"] = explain(stats, d.assistant_turns)  # in a "too few rows" error
        stats["template_left_out"] = left_out_lines(spilled.stats["template_drops"], total, origin)
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


def load_or_build(spec: Any, tokenizer: Any, split: str, cache_root: str | Path) -> tuple[Any, dict]:
    """The packed split from the cache, building it first when needed."""
    key = cache_key(spec, tokenizer, split)
    found = load_cached(cache_root, key) or build(spec, tokenizer, split, cache_root)
    remember(spec, split, cache_root, key)
    return found

