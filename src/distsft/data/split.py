"""A split from the cache: what a rank (or the launcher, or `distsft prepare`) calls to get the packed
train or eval rows of a spec, building the cache when it is missing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from distsft.data import cache as data_cache
from distsft.runtime import dist


def cache_root(spec: Any) -> Path:
    return data_cache.default_cache_root(spec)


def prepare_split(spec: Any, tokenizer: Any, split: str) -> tuple[Any, dict[str, Any]]:
    """Tokenize + mask + pack once: usually `distsft run`/`submit`/`prepare` built the cache already and
    this memory-maps it. When it is missing (another host's cache directory, --no-prepare), each node's
    first rank builds it while the node's other ranks wait on the file system -- never in a collective,
    whose timeout a long build would exceed."""
    from distsft.data.build import build
    e, root = dist.env(), cache_root(spec)
    key = data_cache.cache_key(spec, tokenizer, split)
    found = data_cache.load_cached(root, key)
    if found is None and e.is_local_main:
        if e.world_size > 1:
            dist.warn(f"rank {e.rank}: the {split} data cache is missing in {root}; building it on this node "
                      "(run `distsft prepare` first to build it once, before the job)")
        found = build(spec, tokenizer, split, root)
    elif found is None:
        found = _wait_for_cache(root, key)
    if e.is_local_main:
        data_cache.remember(spec, split, root, key)  # lets the next `distsft run` skip the tokenizer
    return found


def _wait_for_cache(root: Path, key: str, poll_s: float = 2.0) -> tuple[Any, dict[str, Any]]:
    """Poll for the cache the node's first rank is building. If that rank fails, the launcher
    (torchrun, srun --kill-on-bad-exit) stops this one."""
    while True:
        found = data_cache.load_cached(root, key)
        if found is not None:
            return found
        time.sleep(poll_s)


def eval_sets(ds: Any, stats: dict[str, Any]) -> Any:
    """The eval cache as the trainer takes it: one dataset, or {label: rows} when there are several sets
    (each set's rows are contiguous, see data.pack_write)."""
    sets = stats.get("eval_sets") or []
    if len(sets) <= 1:
        return ds
    return {s["label"]: ds.select(range(*s["rows"])) for s in sets}
