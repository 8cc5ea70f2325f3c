"""Which `data.format` a file is in, from its first records: for `distsft init --data FILE`.

A guess that could be wrong is refused, not made: a record that fits two formats (a `messages` list
and a `text` column, say), records that disagree, or one that fits none is exit 2 naming the file, the
record and its columns, and the user sets `format` (and `columns`) themselves.

| format            | the record has                                                      |
|-------------------|---------------------------------------------------------------------|
| messages          | `messages`: a list of {role, content}                                |
| sharegpt          | `conversations`: a list of {from, value}                             |
| messages (+columns) | `conversations`: a list of {role, content} (columns maps it)       |
| instruction       | `instruction` and `output` (strings; `input` optional)               |
| prompt_completion | `prompt` and `completion`                                           |
| text              | `text` (a string), and nothing of the above                         |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distsft.data.sources import Reader, chunk_records
from distsft.errors import SpecError

SAMPLE = 20


@dataclass(frozen=True)
class Sniffed:
    format: str
    why: str                                  # one line for init's comment
    columns: dict[str, str] = field(default_factory=dict)  # source.columns, when a column is renamed
    examples: int = 0                         # records in the file


def _turns(v: Any, keys: tuple[str, str]) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(m, dict) and keys[0] in m and keys[1] in m for m in v)


def _candidates(rec: dict[str, Any]) -> list[tuple[str, str, dict[str, str]]]:
    """Every format this one record fits: (format, why, columns)."""
    out = []
    if _turns(rec.get("messages"), ("role", "content")):
        out.append(("messages", "records have 'messages' with role/content turns", {}))
    conv = rec.get("conversations")
    if _turns(conv, ("from", "value")):
        out.append(("sharegpt", "records have 'conversations' with from/value turns (ShareGPT)", {}))
    elif _turns(conv, ("role", "content")):
        out.append(("messages", "records have 'conversations' with role/content turns",
                    {"messages": "conversations"}))
    if isinstance(rec.get("instruction"), str) and isinstance(rec.get("output"), str):
        out.append(("instruction", "records have 'instruction' and 'output' (Alpaca)", {}))
    if "prompt" in rec and "completion" in rec:
        out.append(("prompt_completion", "records have 'prompt' and 'completion'", {}))
    if isinstance(rec.get("text"), str) and not out:
        out.append(("text", "records have a 'text' column and no conversation columns", {}))
    elif isinstance(rec.get("text"), str):
        out.append(("text", "records also have a 'text' column", {}))
    return out


def sniff(path: str | Path, label: str) -> Sniffed:
    """The format of a local data file from its first records; SpecError (exit 2) when it cannot be
    told for certain. `label` names the file in messages (e.g. "--data train.jsonl")."""
    p = Path(path)
    if not p.exists():
        raise SpecError(f"{label}: file not found: {path}")
    reader = Reader(str(p), label, columns=[])
    first = next(iter(reader.chunks()), None)
    records = chunk_records(first)[:SAMPLE] if first is not None else []
    if not records:
        raise SpecError(f"{label}: no records in {path}")
    seen: tuple[str, str, dict[str, str]] | None = None
    for where, rec in records:
        if not isinstance(rec, dict):
            raise SpecError(f"{where}: a record must be an object with named fields, got {type(rec).__name__}")
        found = _candidates(rec)
        if not found:
            raise SpecError(f"{where}: no data.format fits a record with fields {sorted(rec)}; set the format and "
                            "columns in the spec (formats: messages, sharegpt, instruction, prompt_completion, text)")
        if len({f for f, _, _ in found}) > 1:
            raise SpecError(f"{where}: the record fits more than one data.format "
                            f"({', '.join(sorted({f for f, _, _ in found}))}); set data.format yourself")
        if seen is not None and (found[0][0], found[0][2]) != (seen[0], seen[2]):
            raise SpecError(f"{where}: this record is {found[0][0]} but earlier ones are {seen[0]}; "
                            "split the file or set data.format yourself")
        seen = seen or found[0]
    assert seen is not None
    return Sniffed(seen[0], f"sniffed from {len(records)} record(s): {seen[1]}", seen[2], len(reader))
