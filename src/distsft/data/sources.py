"""Reading records: local files (JSONL/JSON/Parquet), `save_to_disk` directories and hub datasets.

Every record comes with `where` (file:line or file[row i]) so that errors can name it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

from distsft.spec import SpecError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_DATA_EXT = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.lower().endswith(_DATA_EXT)


def _iter_source(name: str, columns: list[str]) -> Iterator[tuple[str, Any]]:
    """(where, record) for every record of one file, directory or hub id; `where` is file:line or
    file[row i], for error messages."""
    path = Path(name)
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk
        try:
            ds = load_from_disk(str(path))
        except Exception as exc:
            raise SpecError(f"{name}: a directory must be a dataset saved with save_to_disk ({exc})") from None
        if isinstance(ds, DatasetDict):
            if "train" not in ds:
                raise SpecError(f"{name}: dataset has splits {sorted(ds)}, none called 'train'")
            ds = ds["train"]
        yield from _iter_rows(name, ds.column_names, ds.to_list(), columns)
    elif path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from _iter_jsonl(path)
        elif suffix == ".json":
            text = path.read_text(encoding="utf-8")
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                if exc.msg != "Extra data":  # JSON Lines saved as .json is common: read it as such
                    raise SpecError(f"{name}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None
                yield from _iter_jsonl(path)
                return
            if isinstance(obj, dict) and obj and all(isinstance(v, list) for v in obj.values()):
                keys = list(obj)
                obj = [dict(zip(keys, vals)) for vals in zip(*obj.values())]  # column-oriented JSON
            if not isinstance(obj, list):
                raise SpecError(f"{name}: expected a JSON array of records (or JSON Lines)")
            yield from _iter_rows(name, None, obj, columns)
        elif suffix == ".parquet":
            import pyarrow.parquet as pq
            table = pq.read_table(path)
            yield from _iter_rows(name, table.column_names, table.to_pylist(), columns)
        else:
            raise SpecError(f"{name}: unsupported file type {suffix or '(none)'}; use .jsonl, .json, "
                            ".parquet or a directory written by Dataset.save_to_disk")
    elif _is_hub_id(name):
        from datasets import load_dataset
        try:
            ds = load_dataset(name, split="train")
        except Exception as exc:
            raise SpecError(f"data file {name!r} is not a local path, and loading it as a Hugging Face Hub "
                            f"dataset failed ({type(exc).__name__}: {str(exc)[:300]})") from None
        yield from _iter_rows(name, ds.column_names, ds.to_list(), columns)
    else:
        raise SpecError(f"data file not found: {name}")


def _iter_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise SpecError(f"{path}:{lineno}: not valid JSON ({exc.msg}, column {exc.colno})") from None


def _iter_rows(name: str, have: list[str] | None, rows: list, columns: list[str]) -> Iterator[tuple[str, Any]]:
    if have is not None:  # tabular sources: check the schema once, before any row
        for col in columns:
            if col not in have:
                raise SpecError(f"{name}: no column {col!r}; columns are {have}")
    for i, row in enumerate(rows):
        yield f"{name}[row {i}]", row
