"""Bundled model configs: the architecture of popular families, shipped with distsft so that `init` and
`plan` know a model's size and shape without downloading anything.

The files under `distsft/assets/models/` are config.json files written from the models' published
configs (architecture fields only; see the README there); `index.json` maps each to its hub ids. A name
is looked up by its hub id (`Qwen/Qwen2.5-7B-Instruct`), by the name alone (`Qwen2.5-7B-Instruct`) or by
the file's stem (`qwen2.5-7b`), case-insensitively. Pure: json only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Bundled:
    stem: str             # file name without .json
    hub_id: str           # the id written into a spec (the first listed, or the one asked for)
    family: str
    published_parameters: str
    config: dict[str, Any]


def _root() -> Path:
    return Path(str(resources.files("distsft") / "assets" / "models"))


@lru_cache(maxsize=1)
def index() -> dict[str, dict[str, Any]]:
    return json.loads((_root() / "index.json").read_text())


@lru_cache(maxsize=1)
def _names() -> dict[str, tuple[str, str]]:
    """lower-cased name -> (stem, hub id to write)."""
    out: dict[str, tuple[str, str]] = {}
    for stem, entry in index().items():
        ids = entry["hub_ids"]
        out[stem.lower()] = (stem, ids[0])
        for hub_id in ids:
            out[hub_id.lower()] = (stem, hub_id)
            out.setdefault(hub_id.split("/", 1)[1].lower(), (stem, hub_id))
    return out


def lookup(name: str) -> Bundled | None:
    found = _names().get(name.strip().lower())
    if found is None:
        return None
    stem, hub_id = found
    entry = index()[stem]
    config = json.loads((_root() / f"{stem}.json").read_text())
    return Bundled(stem, hub_id, entry["family"], entry["published_parameters"], config)


def families() -> dict[str, list[str]]:
    """{family: [hub ids]} for messages and the README."""
    out: dict[str, list[str]] = {}
    for entry in index().values():
        out.setdefault(entry["family"], []).extend(entry["hub_ids"])
    return out


def all_stems() -> list[str]:
    return list(index())
