"""Relative paths in a spec resolve from the spec file's directory; overrides from the working directory.

A spec that names `data/train.jsonl` means the file next to it, wherever `distsft` is started from
(before, it meant `./data/train.jsonl` of the shell's directory, so the same spec read different files
depending on where it ran). A path given on the command line (`data.train_files=x.jsonl`) is the
user's shell talking, so it resolves from the working directory as shells do. Paths become absolute
here, before validation, so run.yaml (the resolved spec the ranks read) names the same files from any
directory.

Values that may be a Hugging Face Hub id rather than a path (`model.name_or_path`, a data source's
`path`) are resolved only when they name something that exists relative to the base, or are plainly
paths (`./x`, `../x`, a data file extension); `org/name` otherwise stays a hub id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

_DATA_EXT = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")
_NAMED_TEMPLATES_HINT = (".jinja", ".j2", ".json")


def _plain_path(value: str) -> bool:
    return value.startswith(("./", "../", "~")) or value.lower().endswith(_DATA_EXT)


def _maybe_hub(value: str, base: Path) -> str:
    """A path when it is one; a hub id stays as it is."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return value
    if (base / p).exists() or _plain_path(value):
        return str((base / p).resolve())
    return value


def _always(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    return value if p.is_absolute() else str((base / p).resolve())


def _template(value: str, base: Path) -> str:
    if "{{" in value or "{%" in value:  # a Jinja template given inline
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return value
    looks = "/" in value or value.endswith(_NAMED_TEMPLATES_HINT) or value.startswith(".")
    return str((base / p).resolve()) if (base / p).exists() or looks else value  # else a name


def _dataset_info(value: str, base: Path) -> str:
    path, sep, name = value.partition("#")
    return _always(path, base) + sep + name if path else value


def _resume(value: str, base: Path) -> str:
    return value if value in ("auto", "never") else _always(value, base)


# (path of keys, how to resolve); "*" is every item of a list.
_KEYS: list[tuple[tuple[str, ...], Callable[[str, Path], str]]] = [
    (("model", "name_or_path"), _maybe_hub),
    (("data", "train_files", "*"), _maybe_hub),
    (("data", "eval_files", "*"), _maybe_hub),
    (("data", "sources", "*", "path"), _maybe_hub),
    (("data", "eval_sources", "*", "path"), _maybe_hub),
    (("data", "sources", "*", "dataset_info"), _dataset_info),
    (("data", "eval_sources", "*", "dataset_info"), _dataset_info),
    (("data", "chat_template"), _template),
    (("data", "cache_dir"), _always),
    (("checkpoint", "resume"), _resume),
    (("output_dir",), _always),
]


def resolve_paths(raw: dict[str, Any], base: Path, touched: set[tuple[str, ...]] = frozenset(),
                  cwd: Path | None = None) -> None:
    """Make the spec's relative paths absolute, in place: from `base` (the spec's directory), or from
    `cwd` for keys set on the command line (`touched`, as apply_overrides reports them)."""
    cwd = cwd or Path.cwd()

    def walk(node: Any, keys: tuple[str, ...], done: tuple[str, ...], fn: Callable[[str, Path], str]) -> Any:
        if not keys:
            if not isinstance(node, str) or not node:
                return node
            overridden = any(done[:n] in touched for n in range(1, len(done) + 1))
            return fn(node, cwd if overridden else base)
        head, rest = keys[0], keys[1:]
        if head == "*":
            if isinstance(node, str):  # train_files: one string is a one-item list
                return walk(node, rest, done, fn)
            if isinstance(node, list):
                return [walk(v, rest, done + (str(i),), fn) for i, v in enumerate(node)]
            return node
        if isinstance(node, dict) and head in node:
            node[head] = walk(node[head], rest, done + (head,), fn)
        return node

    for keys, fn in _KEYS:
        walk(raw, keys, (), fn)
