"""Sharded safetensors written a tensor at a time.

safetensors' own `save_file` turns every tensor of a shard into a bytes copy before writing, so it
holds a shard twice. The format is simple (an 8-byte header length, a JSON header with each tensor's
dtype, shape and byte range, then the raw bytes), and its offsets follow from the shapes alone: the
header is written first and each tensor is read from its source, cast, written and dropped. Peak memory
is then about the largest tensor (read + cast), not a shard. HF's file names and index layout
(`model-00001-of-0000N.safetensors`, `model.safetensors.index.json`) are kept, so `from_pretrained`
and the hub's tools read the export as they read any model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable

_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
          "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """"2GB", "500MB", "64MiB" or a byte count, as HF's max_shard_size takes it."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]I?B|B)?\s*", str(text).upper())
    if not m:
        raise ValueError(f"not a size: {text!r} (e.g. 2GB, 500MB)")
    return int(float(m.group(1)) * _UNITS[m.group(2) or ""])


def nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n * dtype.itemsize


def plan(entries: list[tuple[str, tuple[int, ...], Any]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...], Any]]]:
    """Tensors (name, shape, dtype) in order, cut into shards of at most max_bytes (a tensor larger than
    that gets a shard of its own, as in HF's sharding)."""
    shards: list[list] = [[]]
    size = 0
    for e in entries:
        b = nbytes(e[1], e[2])
        if shards[-1] and size + b > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += b
    return [s for s in shards if s]


def shard_names(count: int, stem: str = "model") -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _header(entries: list[tuple[str, tuple[int, ...], Any]]) -> bytes:
    head: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in entries:
        end = offset + nbytes(shape, dtype)
        head[name] = {"dtype": _CODES[str(dtype).removeprefix("torch.")], "shape": list(shape),
                      "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(head, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it


def write_shard(path: Path, entries: list[tuple[str, tuple[int, ...], Any]],
                produce: Callable[[str], Any]) -> None:
    """Write one shard; `produce(name)` returns the tensor in its export dtype, called once per tensor in
    order. Written to a temporary name and renamed, so a file under the final name is whole."""
    import torch
    head = _header(entries)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for name, shape, dtype in entries:
            t = produce(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise RuntimeError(f"{name}: produced {tuple(t.shape)} {t.dtype}, planned {shape} {dtype}")
            flat = t.detach().contiguous().reshape(-1)
            if flat.numel():
                f.write(flat.view(torch.uint8).numpy().data)  # no copy of the tensor's bytes
            del t, flat
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_model(out: Path, entries: Iterable[tuple[str, tuple[int, ...], Any]], produce: Callable[[str], Any],
                max_bytes: int, stem: str = "model", progress: Callable[[str], None] | None = None) -> list[str]:
    """All shards and, when there are several, HF's index; returns the file names written."""
    entries = list(entries)
    shards = plan(entries, max_bytes)
    names = shard_names(len(shards), stem)
    weight_map: dict[str, str] = {}
    for fname, shard in zip(names, shards):
        write_shard(out / fname, shard, produce)
        weight_map.update({e[0]: fname for e in shard})
        if progress:
            progress(f"  wrote {fname} ({sum(nbytes(e[1], e[2]) for e in shard) / 2**20:,.1f} MiB, "
                     f"{len(shard)} tensors)")
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(nbytes(e[1], e[2]) for e in entries)}, "weight_map": weight_map}
        (out / f"{stem}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names
