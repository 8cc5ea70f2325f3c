"""Which records a split reads: the sources of the training mixture and of the eval sets, and how many
times each record is taken (fraction / count, and the validation hold-out).

Selection is a function of `train.seed` and the sources only (never of the world size or num_proc):
a source of N records with fraction f (or count k = round(f * N)) takes every record k // N times and
k % N more records, drawn without replacement by a generator seeded with (seed, split, source index).
`data.val_set_size` then holds out whole records of the training mixture (all copies of a repeated
record, so that no validation example is also trained on), drawn the same way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distsft.config.sections import SourceSpec
from distsft.errors import SpecError

VAL_LABEL = "val"


@dataclass(frozen=True)
class Source:
    key: str          # the spec key it came from: data.sources, data.train_files, ...
    index: int
    spec: SourceSpec

    @property
    def name(self) -> str:
        """How messages name it: its key, index and path."""
        return f"{self.key}[{self.index}] ({self.spec.path})"

    @property
    def random(self) -> bool:
        """Whether its selection draws records (and so depends on the seed)."""
        f, c = self.spec.fraction, self.spec.count
        return c is not None or (f is not None and f != int(f))


@dataclass(frozen=True)
class EvalSet:
    label: str
    sources: list[Source]
    val: bool = False  # held out from the training mixture


def _data(spec: Any) -> Any:
    return getattr(spec, "data", spec)


def seed_of(spec: Any) -> int:
    return int(getattr(getattr(spec, "train", None), "seed", 42))


def train_sources(spec: Any) -> list[Source]:
    d = _data(spec)
    if d.sources:
        return [Source("data.sources", i, s) for i, s in enumerate(d.sources)]
    return [Source("data.train_files", i, SourceSpec(path=f)) for i, f in enumerate(d.train_files)]


def _label(path: str) -> str:
    name = Path(path.rstrip("/")).name
    for ext in (".jsonl", ".json", ".parquet", ".csv"):
        name = name.removesuffix(ext)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "eval"


def eval_sets(spec: Any) -> list[EvalSet]:
    """The validation hold-out first (label `val`), then one set per eval source, labels made unique."""
    d = _data(spec)
    out = [EvalSet(VAL_LABEL, train_sources(spec), val=True)] if d.val_set_size else []
    if d.eval_sources:
        entries = [("data.eval_sources", i, s, s.label) for i, s in enumerate(d.eval_sources)]
    else:
        entries = [("data.eval_files", i, SourceSpec(path=f), None) for i, f in enumerate(d.eval_files)]
    seen = {e.label for e in out}
    for key, i, s, label in entries:
        base = label or _label(s.path)
        label, n = base, 1
        while label in seen:
            n += 1
            label = f"{base}_{n}"
        seen.add(label)
        src = SourceSpec(**{k: v for k, v in s.model_dump().items() if k in SourceSpec.model_fields})
        out.append(EvalSet(label, [Source(key, i, src)]))
    return out


def select(n: int, src: Source, seed: int, stream: str) -> np.ndarray | None:
    """Copies of each of the source's `n` records to take (uint32), or None for "each once"."""
    f, c = src.spec.fraction, src.spec.count
    if n == 0:
        raise SpecError(f"{src.name}: no records")
    if c is None and (f is None or f == 1.0):
        return None
    k = c if c is not None else int(round(f * n))
    if k < 1:
        raise SpecError(f"{src.name}: fraction {f} of {n} records selects no examples (raise fraction, or set count)")
    full, rem = divmod(k, n)
    mult = np.full(n, full, dtype=np.uint32)
    if rem:
        rng = np.random.default_rng([seed, _stream_id(stream), src.index])
        mult[rng.choice(n, rem, replace=False)] += 1
    return mult


def _stream_id(stream: str) -> int:
    return {"train": 0, "eval": 1, "val": 2}.get(stream, 3)


def hold_out(mults: list[np.ndarray | None], sizes: list[int], val_size: int | float, seed: int,
             names: list[str]) -> tuple[list[np.ndarray | None], list[np.ndarray]]:
    """Split the training selection: (train multiplicities, validation masks), whole records at a time."""
    taken = [m > 0 if m is not None else np.ones(n, dtype=bool) for m, n in zip(mults, sizes)]
    distinct = int(sum(t.sum() for t in taken))
    examples = int(sum(int(m.sum()) if m is not None else n for m, n in zip(mults, sizes)))
    k = val_size if isinstance(val_size, int) else int(round(val_size * examples))
    if k < 1:
        raise SpecError(f"data.val_set_size={val_size} of {examples} training examples holds out none; "
                        "raise it, or give a count")
    if k >= distinct:
        raise SpecError(f"data.val_set_size={val_size} holds out {k} examples, but the training mixture "
                        f"({', '.join(names)}) has only {distinct} distinct records")
    pick = np.sort(np.random.default_rng([seed, _stream_id("val")]).choice(distinct, k, replace=False))
    train, val, base = [], [], 0
    for m, t in zip(mults, taken):
        idx = np.flatnonzero(t)  # the source's selected records, in the global numbering base + j
        mask = np.zeros(t.size, dtype=bool)
        lo, hi = np.searchsorted(pick, [base, base + idx.size])
        mask[idx[pick[lo:hi] - base]] = True
        base += idx.size
        m = (m.copy() if m is not None else np.ones(t.size, dtype=np.uint32))
        m[mask] = 0
        train.append(m)
        val.append(mask)
    return train, val
