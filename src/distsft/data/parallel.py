"""The streaming, parallel half of the build: chunks of records -> tokens and labels on disk.

`encode_streams` walks the streams of a split (each a source reader with its multiplicities) chunk
by chunk, encodes the chunks in `num_proc` worker processes (a fork Pool whose initializer holds the
tokenizer; every worker builds its `Encoder`s once) and appends each chunk's tokens and labels to two
flat int32 files as results come back, in chunk order. At most a few chunks are in flight, so memory
stays flat whatever the data size; what stays in memory is one length (int32) per example.

The result does not depend on `num_proc`: chunks are cut the same way, encoded by the same function
and written in chunk order. Within a chunk, `overlong.apply_overlong` (truncate/drop, the first token of an
example never a target) is per example, so it runs in the workers too.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from distsft.data.overlong import apply_overlong
from distsft.data.drops import merge as merge_drops
from distsft.data.sources import Chunk, Reader, chunk_records
from distsft.errors import SpecError
from distsft.runtime import envvars

_IN_FLIGHT_PER_WORKER = 2
# Starting workers costs seconds (a fresh interpreter imports the tokenizer); below this many chunks
# the build runs in this process. The result is the same either way.
MIN_CHUNKS_FOR_WORKERS = 4


@dataclass
class Stream:
    """One source as one split reads it: which records, how often, with which DataSpec."""
    name: str                       # for messages: data.sources[i] (path)
    reader: Reader
    spec: Any                       # the DataSpec for this source (its format applied)
    columns: dict[str, str]         # {name the format expects: name in the source}
    mult: np.ndarray | None         # copies of each record (None: each once)
    set_index: int = 0              # which eval set (0 for train)
    mapping: Any = None             # data/peers.py: a LLaMA-Factory / axolotl description (columns then unused)
    examples: int = 0               # filled by encode_streams: examples it produced
    kept: int = 0                   # ... and kept (after overlong handling)

    def selected(self) -> int:
        return len(self.reader) if self.mult is None else int(self.mult.sum())


@dataclass
class Spilled:
    """The encoded examples of a split, on disk: tokens and labels back to back, lengths in memory."""
    ids_path: Path
    labels_path: Path
    lengths: np.ndarray                       # int32 per kept example
    set_of: np.ndarray                        # int32 per kept example: its eval set (0 for train)
    stats: dict[str, Any]  # counts, and "drops" / "template_drops" (data/drops.py)
    warnings: set[str] = field(default_factory=set)
    source_of: np.ndarray | None = None       # int32 per kept example: its stream (= data.sources index for train)


def default_num_proc() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


# --------------------------------------------------------------------------- in the worker

_WORKER: dict[str, Any] = {}


def _init(tokenizer: Any, specs: list[Any]) -> None:
    envvars.tokenizers_single_threaded()
    _WORKER.clear()
    _WORKER.update(tokenizer=tokenizer, specs=specs, encoders={})


def _encoder(i: int) -> Any:
    enc = _WORKER["encoders"].get(i)
    if enc is None:
        from distsft.data.examples import Encoder
        spec, mapping = _WORKER["specs"][i]
        enc = _WORKER["encoders"][i] = Encoder(_WORKER["tokenizer"], spec, mapping)
    return enc


def rename_columns(pairs: list, columns: dict[str, str], name: str) -> list:
    if not columns:
        return pairs
    for where, rec in pairs:
        if not isinstance(rec, dict):
            continue  # the format names the problem
        for new, old in columns.items():
            if old not in rec:
                raise SpecError(f"{where}: no column {old!r} ({name}: columns maps {new!r} to it); "
                                f"keys are {sorted(rec)}")
            rec[new] = rec.pop(old)
    return pairs


def encode_chunk(task: tuple[int, Chunk, dict[str, str], str, np.ndarray | None]) -> tuple:
    """One chunk: read, rename columns, repeat/skip records, encode, handle overlong examples."""
    spec_i, chunk, columns, name, mult = task
    try:
        pairs = rename_columns(chunk_records(chunk), columns, name)
        if mult is not None:
            pairs = [p for p, k in zip(pairs, mult.tolist()) for _ in range(k)]
        spec = _WORKER["specs"][spec_i][0]
        enc = _encoder(spec_i)(pairs)
    except SpecError as exc:  # the row's error names file:line; say which source of the mixture too
        if str(exc).startswith(name):
            raise
        key, _, path = name.partition(" (")  # "data.sources[1] (path)": the path only where exc lacks it
        raise SpecError(f"{key if path[:-1] and path[:-1] in str(exc) else name}: {exc}") from None
    tok, stats = apply_overlong(enc.input_ids, enc.labels.copy(), enc.lengths, spec, enc.wheres)
    stats["template_drops"] = enc.template_drops
    return (tok["input_ids"].astype(np.int32, copy=False), tok["labels"].astype(np.int32, copy=False),
            tok["lengths"].astype(np.int32), int(enc.lengths.size), stats, set(enc.warnings))


# --------------------------------------------------------------------------- in the main process

def _tasks(streams: list[Stream], spec_index: list[int]) -> Iterator[tuple[int, tuple]]:
    for si, s in enumerate(streams):
        for chunk in s.reader.chunks():
            mult = None if s.mult is None else s.mult[chunk.first:chunk.first + chunk.n]
            if mult is not None and not mult.any():
                continue  # nothing taken from this chunk
            yield si, (spec_index[si], chunk, s.columns, s.name, mult)


def encode_streams(streams: list[Stream], tokenizer: Any, num_proc: int, spill_dir: Path,
                   progress: Any = None) -> Spilled:
    specs: list[Any] = []
    spec_index = []
    for s in streams:  # one Encoder per distinct (DataSpec, mapping), built once per worker
        if (s.spec, s.mapping) not in specs:
            specs.append((s.spec, s.mapping))
        spec_index.append(specs.index((s.spec, s.mapping)))
    ids_path, labels_path = spill_dir / "input_ids.i32", spill_dir / "labels.i32"
    lengths, sets, srcs = [], [], []
    totals = {"num_examples": 0, "num_dropped": 0, "num_truncated": 0, "num_tokens": 0, "num_loss_tokens": 0}
    drops: dict[str, dict] = {}  # reason -> count and first rows, in chunk order (data/drops.py)
    template_drops: dict[str, int] = {}  # what the template leaves out: system, tools -> conversations
    warnings: set[str] = set()
    with open(ids_path, "wb") as f_ids, open(labels_path, "wb") as f_labels:
        def take(si: int, result: tuple) -> None:
            ids, labels, lens, produced, stats, warn = result
            ids.tofile(f_ids)
            labels.tofile(f_labels)
            lengths.append(lens)
            sets.append(np.full(lens.size, streams[si].set_index, dtype=np.int32))
            srcs.append(np.full(lens.size, si, dtype=np.int32))
            for k in totals:
                totals[k] += stats[k]
            merge_drops(drops, stats["drops"])
            for k, v in stats["template_drops"].items():
                template_drops[k] = template_drops.get(k, 0) + v
            streams[si].examples += produced
            streams[si].kept += int(lens.size)
            warnings.update(warn)
            if progress is not None:
                progress.advance(produced)

        tasks = _tasks(streams, spec_index)
        chunks = sum(-(-len(s.reader) // s.reader.chunk) for s in streams)
        if num_proc <= 1 or chunks < MIN_CHUNKS_FOR_WORKERS:
            _init(tokenizer, specs)
            for si, task in tasks:
                take(si, encode_chunk(task))
        else:
            _run_pool(tasks, tokenizer, specs, num_proc, take)
    return Spilled(ids_path, labels_path, _concat(lengths), _concat(sets),
                   {**totals, "drops": drops, "template_drops": template_drops}, warnings, _concat(srcs))


def _run_pool(tasks: Iterator, tokenizer: Any, specs: list[Any], num_proc: int, take: Any) -> None:
    """Results in task order, with a bounded number of tasks in flight (Pool.imap would read every
    chunk of the sources ahead into its queue)."""
    # forkserver, not fork: this process has threads (torch's, the tokenizer's, a rank's), and a child
    # forked while one of them holds a lock can hang. The server is a fresh interpreter that imports
    # the main module and the tokenizer's once; every worker forks from it and unpickles the tokenizer.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["__main__", "distsft.data.parallel", "distsft.data.examples", type(tokenizer).__module__])
    with ctx.Pool(num_proc, initializer=_init, initargs=(tokenizer, specs)) as pool:
        pending: deque = deque()
        for si, task in tasks:
            pending.append((si, pool.apply_async(encode_chunk, (task,))))
            if len(pending) >= num_proc * _IN_FLIGHT_PER_WORKER:
                si0, res = pending.popleft()
                take(si0, res.get())
        while pending:
            si0, res = pending.popleft()
            take(si0, res.get())


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, dtype=np.int32)
