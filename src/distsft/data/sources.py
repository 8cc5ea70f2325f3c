"""Reading records, in chunks: local files (JSONL/JSON/Parquet/CSV), `save_to_disk` directories, data
directories and hub datasets.

A `Reader` opens one source, checks what can be checked before any record is read (the file exists,
the split and subset exist, the columns are there), counts its records, and cuts it into `Chunk`s of
consecutive records. A chunk is small and cheap to pickle: JSON Lines chunks are byte ranges that the
worker process reads and parses itself; tabular chunks carry their rows as an Arrow IPC buffer. So the
build never holds a source as Python objects (a JSON array file, which cannot be read in parts, is the
one exception). Every record comes with `where` (file:line or name[row i]) so that errors can name it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from distsft.errors import NotReachable, SpecError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_EXT = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")
TABLE_EXT = (".parquet", ".csv")


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.lower().endswith(_DATA_EXT)


@dataclass(frozen=True)
class Chunk:
    """Records [first, first + n) of one source, in a form a worker can read."""
    kind: str           # "jsonl" (byte range), "arrow" (IPC buffer) or "rows" (pickled records)
    name: str           # the source's path, for `where`
    first: int          # index of the first record in the source
    n: int
    payload: Any        # (byte_lo, byte_hi, first_line) | bytes | list


def chunk_records(chunk: Chunk) -> list[tuple[str, Any]]:
    """The `(where, record)` pairs of a chunk (runs in the worker process)."""
    if chunk.kind == "jsonl":
        lo, hi, line = chunk.payload
        with open(chunk.name, "rb") as f:
            f.seek(lo)
            blob = f.read(hi - lo)
        out = []
        for raw in blob.split(b"\n"):
            if raw.strip():
                try:
                    out.append((f"{chunk.name}:{line}", json.loads(raw)))
                except json.JSONDecodeError as exc:
                    raise SpecError(f"{chunk.name}:{line}: not valid JSON ({exc.msg}, column {exc.colno})") from None
            line += 1
        return out
    if chunk.kind == "arrow":
        import pyarrow as pa
        rows = pa.ipc.open_stream(pa.py_buffer(chunk.payload)).read_all().to_pylist()
    else:
        rows = chunk.payload
    return [(f"{chunk.name}[row {chunk.first + i}]", r) for i, r in enumerate(rows)]


class Reader:
    """One source: opened and checked at construction; `len()` records; `chunks(size)` in order.

    `label` names the source in messages (e.g. "data.sources[1] (chats.parquet)"); `columns` are the
    column names the source must have (after renaming), checked before any row for tabular sources."""

    def __init__(self, path: str, label: str, columns: list[str], split: str = "train",
                 subset: str | None = None, revision: str | None = None, chunk: int = 8192):
        self.path, self.label, self.split, self.subset, self.chunk = path, label, split, subset, chunk
        self._table = None    # Arrow table (memory-mapped for datasets; CSV read whole, as Arrow)
        self._parquet = None  # pyarrow ParquetFile, read batch by batch
        self._rows = None     # JSON array records
        self._offsets: list[tuple[int, int]] = []  # JSONL: (byte offset, line) of every chunk-th record
        self._count = 0
        p = Path(path)
        if p.exists() and not self._is_data_dir(p):
            # A file (or a saved dataset) is one subset; only a saved DatasetDict has splits.
            bad = [(k, v) for k, v in (("subset", subset), ("revision", revision)) if v is not None]
            if p.is_file() and split != "train":
                bad.insert(0, ("split", split))
            if bad:
                raise SpecError(f"{label}: {bad[0][0]} {bad[0][1]!r}: a local file has no {bad[0][0]}s; "
                                "list other files as other sources")
        if p.is_dir():
            self._open_dir(p)
        elif p.is_file():
            self._open_file(p)
        elif _is_hub_id(path):
            self._open_hub(revision)
        else:
            raise SpecError(f"{label}: data file not found: {path}")
        if self._table is not None or self._parquet is not None:
            have = (self._table.schema if self._table is not None else self._parquet.schema_arrow).names
            missing = [c for c in columns if c not in have]
            if missing:
                raise SpecError(f"{label}: no column {missing[0]!r}; columns are {have}")

    # ------------------------------------------------------------------ opening
    @staticmethod
    def _is_data_dir(p: Path) -> bool:
        """A directory of data files (train.jsonl, test.jsonl, ...) that `datasets` reads by split."""
        return p.is_dir() and not (p / "state.json").exists() and not (p / "dataset_dict.json").exists()

    def _open_dir(self, p: Path) -> None:
        from datasets import DatasetDict, load_from_disk
        if self._is_data_dir(p):
            return self._load_dataset(str(p), None)
        try:
            ds = load_from_disk(str(p))
        except Exception as exc:  # noqa: BLE001 - a broken directory is a user error
            raise SpecError(f"{self.label}: a directory must be a dataset saved with save_to_disk or a "
                            f"folder of data files ({exc})") from None
        if isinstance(ds, DatasetDict):
            if self.split not in ds:
                raise SpecError(f"{self.label}: split {self.split!r} not found; the dataset has splits "
                                f"{sorted(ds)} (set split)")
            ds = ds[self.split]
        elif self.split != "train":
            raise SpecError(f"{self.label}: split {self.split!r}: this saved dataset has one split only")
        self._table = ds.data.table if hasattr(ds.data, "table") else ds.data

    def _open_file(self, p: Path) -> None:
        suffix = p.suffix.lower()
        if suffix == ".jsonl":
            self._index_jsonl(p)
        elif suffix == ".json":
            text = p.read_text(encoding="utf-8")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                if exc.msg != "Extra data":  # JSON Lines saved as .json is common: read it as such
                    raise SpecError(f"{self.path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
                del text
                return self._index_jsonl(p)
            if isinstance(obj, dict):
                obj = _object_rows(obj)
            if not isinstance(obj, list):
                raise SpecError(f"{self.label}: expected a JSON array of records, one JSON object (one record) "
                                f"or JSON Lines; the file holds a JSON {type(obj).__name__}")
            self._rows = obj
        elif suffix == ".parquet":
            import pyarrow.parquet as pq
            try:
                self._parquet = pq.ParquetFile(p, memory_map=True)
            except Exception as exc:  # noqa: BLE001 - a broken file is a user error
                raise SpecError(f"{self.label}: not a readable Parquet file ({exc})") from None
        elif suffix == ".csv":
            import pyarrow.csv as pcsv
            try:
                self._table = pcsv.read_csv(p)
            except Exception as exc:  # noqa: BLE001
                raise SpecError(f"{self.label}: not a readable CSV file ({str(exc).splitlines()[0]})") from None
        else:
            raise SpecError(f"{self.label}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, "
                            ".parquet, .csv or a directory written by Dataset.save_to_disk")

    def _index_jsonl(self, p: Path) -> None:
        """One pass over the bytes: where every chunk-th record (non-blank line) starts; nothing parsed."""
        offsets, pos, count, every = [], 0, 0, self.chunk
        with p.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.isspace():
                    if count % every == 0:
                        offsets.append((pos, lineno))
                    count += 1
                pos += len(raw)
        self._offsets, self._size, self._count = offsets, pos, count

    def _open_hub(self, revision: str | None) -> None:
        self._load_dataset(self.path, revision)

    def _load_dataset(self, name: str, revision: str | None) -> None:
        import datasets
        quiet = datasets.are_progress_bars_disabled()
        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset(name, self.subset, split=self.split, revision=revision)
        except ConnectionError as exc:  # offline, or the hub does not answer: not the user's mistake
            raise NotReachable(self._hub_error(exc)) from None
        except Exception as exc:  # noqa: BLE001 - every other way this fails is the user's source
            raise SpecError(self._hub_error(exc)) from None
        finally:
            if not quiet:
                datasets.enable_progress_bars()
        self._table = ds.data.table if hasattr(ds.data, "table") else ds.data

    def _hub_error(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {str(exc)[:300]}"
        low = str(exc).lower()
        if "split" in low and ("unknown" in low or "not found" in low or "bad split" in low):
            return f"{self.label}: split {self.split!r} not found ({text}) (set split)"
        if "config" in low and ("not found" in low or "unknown" in low or "available" in low):
            return f"{self.label}: subset {self.subset!r} not found ({text}) (set subset)"
        return (f"{self.label}: not a local path, and loading it as a Hugging Face Hub dataset failed ({text}); "
                "offline, a hub dataset must already be in the local datasets cache")

    # ------------------------------------------------------------------ reading
    def __len__(self) -> int:
        if self._table is not None:
            return self._table.num_rows
        if self._parquet is not None:
            return self._parquet.metadata.num_rows
        if self._rows is not None:
            return len(self._rows)
        return self._count

    def chunks(self) -> Iterator[Chunk]:
        """Consecutive chunks of `self.chunk` records (the last may be shorter), in order."""
        n, size = len(self), self.chunk
        if self._parquet is not None:
            lo = 0
            for batch in self._parquet.iter_batches(batch_size=size):
                yield Chunk("arrow", self.path, lo, batch.num_rows, _ipc(batch))
                lo += batch.num_rows
            return
        for i, lo in enumerate(range(0, n, size)):
            k = min(size, n - lo)
            if self._table is not None:
                yield Chunk("arrow", self.path, lo, k, _ipc(self._table.slice(lo, k)))
            elif self._rows is not None:
                yield Chunk("rows", self.path, lo, k, self._rows[lo:lo + k])
            else:
                start, line = self._offsets[i]
                end = self._offsets[i + 1][0] if i + 1 < len(self._offsets) else self._size
                yield Chunk("jsonl", self.path, lo, k, (start, end, line))


def _object_rows(obj: dict) -> list:
    """A JSON object file: column-oriented records ({"text": ["a", "b"]}: equal-length lists of values
    that are not objects), or else one record. A conversation's `messages` / `conversations` list holds
    objects, so a one-record file is no longer cut into "records" of single messages (which then failed
    with a message about the wrong thing)."""
    values = list(obj.values())
    if (values and all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1
            and not any(isinstance(x, dict) for v in values for x in v)):
        keys = list(obj)
        return [dict(zip(keys, vals)) for vals in zip(*values)]
    return [obj]


def _ipc(part: Any) -> bytes:
    """An Arrow table or batch as IPC bytes: writes the slice only (pickling a slice may copy it all)."""
    import pyarrow as pa
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, part.schema) as w:
        w.write(part) if isinstance(part, pa.RecordBatch) else w.write_table(part)
    return sink.getvalue().to_pybytes()


def iter_records(name: str, columns: list[str]) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of one source with default settings (small data, tests)."""
    reader = Reader(name, name, columns)
    for chunk in reader.chunks():
        yield from chunk_records(chunk)


_iter_source = iter_records  # the old name
