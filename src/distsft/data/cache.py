"""Where packed data lives: its cache key, the cache directory, and an index that finds a cached split
without loading the tokenizer.

The cache key hashes what decides the packed tokens: the data files, the loaded tokenizer, the chat
template and the data settings. Computing it needs the tokenizer, and loading a tokenizer imports
transformers (5–10 s), which made a warm `distsft run` slower than plain TRL. The index maps a *source
key* -- the same inputs read from disk (the bytes of the tokenizer's files, the chat template file,
library versions) -- to the cache key, so the launcher's warm path reads two small files. The ranks
always compute the real key from the tokenizer they load, so a stale index can cost a rebuild, never
wrong data.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from distsft.runtime import envvars

DATA_FORMAT_VERSION = 6  # bump when the cached layout or the labelling rules change (4: issue 25; 5: issue 24; 6: issue 21, source_ids)
INDEX_DIR = "index"
DATA_FILE = "data.arrow"  # the packed rows: one Arrow IPC stream, memory-mapped by the readers
# Everything in a model directory can shape the tokenizer (tokenizer*.json, *.model, vocab, merges,
# chat templates, config.json's model_type, remote code) except the weights, which are large.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
# Data settings that cannot change the packed tokens (the sources are fingerprinted on their own).
_NOT_SETTINGS = {"cache_dir", "num_proc", "train_files", "eval_files", "sources", "eval_sources"}


def _data(spec: Any) -> Any:
    return getattr(spec, "data", spec)  # accept a RunSpec or its DataSpec


def _file_fingerprint(name: str) -> list:
    path = Path(name)
    if path.is_file():
        st = path.stat()
        return [str(path.resolve()), st.st_size, st.st_mtime_ns]
    if path.is_dir():
        return [str(path.resolve())] + [[str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns]
                                        for p in sorted(path.rglob("*")) if p.is_file()]
    return ["hub-or-missing", name]


def _source(src: Any, seed: int) -> dict[str, Any]:
    sp = src.spec
    out = {"files": _file_fingerprint(sp.path), **sp.model_dump(exclude={"path", "label"})}  # a label names metrics only
    if src.random:
        out["seed"] = seed
    return out


def _inputs(spec: Any, split: str) -> dict[str, Any]:
    """The part of both keys that needs no tokenizer: format version, sources, data settings."""
    from distsft.data import mixture
    d = _data(spec)
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    settings = d.model_dump(mode="json", exclude=_NOT_SETTINGS)
    if split == "eval":
        settings.pop("max_train_examples", None)
    seed = mixture.seed_of(spec)
    train = [_source(s, seed) for s in mixture.train_sources(spec)]
    val = {"val_set_size": d.val_set_size, "seed": seed} if d.val_set_size else None
    if split == "train":
        sources: Any = {"train": train, "val": val}
    else:
        sources = [{"label": e.label, **({"val": val, "from": train} if e.val else
                                         {"sources": [_source(s, seed) for s in e.sources]})}
                   for e in mixture.eval_sets(spec)]
    return {"version": DATA_FORMAT_VERSION, "split": split, "sources": sources, "settings": settings}


def _digest(obj: Any, n: int = 20) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def cache_key(spec: Any, tokenizer: Any, split: str) -> str:
    from distsft.data.chat import chat_template_or_none
    from distsft.data.encode import tokenizer_fingerprint
    template = chat_template_or_none(tokenizer, _data(spec).chat_template) or ""  # none: the encoder says so
    blob = {**_inputs(spec, split), "tokenizer": tokenizer_fingerprint(tokenizer),
            "chat_template": hashlib.sha256(template.encode()).hexdigest()}
    return f"{split}-{_digest(blob)}"


def default_cache_root(spec: Any) -> Path:
    """data.cache_dir, else $DISTSFT_CACHE_DIR, else ~/.cache/distsft/data."""
    root = getattr(_data(spec), "cache_dir", None) or envvars.cache_dir()
    return Path(root) if root else Path.home() / ".cache" / "distsft" / "data"


def load_cached(cache_root: str | Path, key: str) -> tuple[Any, dict] | None:
    path = Path(cache_root) / key
    if not (path / "stats.json").is_file() or not (path / DATA_FILE).is_file():  # stats.json comes last
        return None
    from datasets import Dataset
    return Dataset.from_file(str(path / DATA_FILE)), json.loads((path / "stats.json").read_text())


# --------------------------------------------------------------------------- the source-key index

def _model_dir(name_or_path: str) -> Path | None:
    """The directory the tokenizer is read from: a local path, or a hub id's snapshot in the HF cache."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists() or name_or_path.count("/") > 1:
        return None
    from huggingface_hub.constants import HF_HUB_CACHE
    repo = Path(HF_HUB_CACHE) / f"models--{name_or_path.replace('/', '--')}"
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snapshot = repo / "snapshots" / commit
    return snapshot if snapshot.is_dir() else None


def _tokenizer_source(model_dir: Path) -> list:
    out = []
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and not p.name.endswith(_WEIGHT_SUFFIXES):
            out.append([p.name, hashlib.sha256(p.read_bytes()).hexdigest()])
    return out


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def source_key(spec: Any, split: str) -> str | None:
    """A key over the on-disk sources of the cache key, or None when they cannot be read without
    loading the tokenizer (a hub model that is not in the local HF cache, or no model section)."""
    if not hasattr(spec, "model"):
        return None
    try:
        model_dir = _model_dir(spec.model.name_or_path)
        if model_dir is None:
            return None
        template = spec.data.chat_template
        if template:  # a file, a directory or a named template: the text counts
            from distsft.config.templates import resolve_text
            found = resolve_text(template)
            template = ["text", found.sha256] if found is not None else template
        blob = {**_inputs(spec, split), "tokenizer_files": _tokenizer_source(model_dir), "chat_template": template,
                "trust_remote_code": spec.model.trust_remote_code,
                "added_tokens": list(getattr(spec.model, "add_special_tokens", None) or []),
                "versions": [_version(d) for d in ("transformers", "tokenizers", "jinja2")]}
    except OSError:  # an unreadable file: the slow path will name it, if it matters
        return None
    return f"{split}-{_digest(blob)}"


def remember(spec: Any, split: str, cache_root: str | Path, key: str) -> None:
    """Record that these sources give cache key `key` (atomically: readers see the old or the new entry)."""
    sk = source_key(spec, split)
    if sk is None:
        return
    index = Path(cache_root) / INDEX_DIR
    tmp = None
    try:
        index.mkdir(parents=True, exist_ok=True)
        # mkstemp: unique per host and process on a shared file system (a pid alone is not)
        fd, name = tempfile.mkstemp(prefix=f".{sk}.tmp-", dir=index)
        tmp = Path(name)
        with os.fdopen(fd, "w") as f:
            f.write(key)
        os.replace(tmp, index / sk)
    except OSError:  # e.g. a shared, read-only cache: only the next start's shortcut is lost
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def cached_stats(spec: Any, split: str, cache_root: str | Path) -> dict | None:
    """The stats of the cached split these sources were last packed into, or None (not known yet)."""
    sk = source_key(spec, split)
    if sk is None:
        return None
    try:
        key = (Path(cache_root) / INDEX_DIR / sk).read_text().strip()
        return json.loads((Path(cache_root) / key / "stats.json").read_text())
    except (OSError, ValueError):
        return None
