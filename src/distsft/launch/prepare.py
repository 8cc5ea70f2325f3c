"""Building the data caches before any rank starts: `distsft prepare`, `distsft submit` (on the submitting
host, before anything is queued), `distsft run` (in the launcher) and `distsft plan`.

Bad data fails here, as one message and exit 2, before a GPU is held. The ranks then memory-map the
caches; they build only when they find them missing (data.split.prepare_split).
"""

from __future__ import annotations

from typing import Any

from distsft.config.spec import RunSpec


def splits(spec: RunSpec) -> list[str]:
    return ["train"] + (["eval"] if spec.data.has_eval else [])


def cached(spec: RunSpec) -> dict[str, dict[str, Any]] | None:
    """The stats of every split when all were already packed from these exact sources: the warm path,
    which skips loading the tokenizer (and importing transformers) just to find the caches."""
    from distsft.data.cache import cached_stats, default_cache_root
    root = default_cache_root(spec)
    found = {split: cached_stats(spec, split, root) for split in splits(spec)}
    return found if all(s is not None for s in found.values()) else None  # type: ignore[return-value]


def build_caches(spec: RunSpec, local_files_only: bool = False,
                 which: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{split: stats} for the train split and (when configured) the eval split, built when missing."""
    wanted = which or splits(spec)
    warm = cached(spec)
    if warm is not None:
        return {k: v for k, v in warm.items() if k in wanted}
    from distsft.runtime import dist
    from distsft.runtime.console import configure_logging
    from distsft.data.split import prepare_split
    from distsft.train.tokens import load_tokenizer
    configure_logging(dist.env().is_main)
    tokenizer = load_tokenizer(spec, local_files_only=local_files_only)
    return {split: prepare_split(spec, tokenizer, split)[1] for split in wanted}


def figures(stats: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What `distsft plan --json` adds about the data: per training source and per eval set."""
    train = stats.get("train") or {}
    out: dict[str, Any] = {"sources": [dict(s) for s in train.get("sources", [])]}
    ev = stats.get("eval")
    out["eval_sets"] = ([{"label": s["label"], "examples": s["examples"]} for s in ev.get("eval_sets", [])]
                        if ev else [])
    return out


def describe(stats: dict[str, dict[str, Any]]) -> list[str]:
    """The data figures as lines for the console."""
    t = stats["train"]
    lines = [f"train: {t['num_examples']:,} examples, {t['num_tokens']:,} tokens ({t['num_loss_tokens']:,} with "
             f"loss) in {t['num_rows']:,} rows of {t['max_length']} (packing efficiency "
             f"{t['packing_efficiency']:.2%}; lower bound {t['lower_bound_rows']:,} rows); "
             f"{t['num_dropped']:,} dropped, {t['num_truncated']:,} truncated"]
    lines += [f"  {line}" for line in t.get("drop_lines", []) + t.get("template_left_out", [])]
    for s in t.get("sources", []):
        where = s["path"] + (f" [{s['subset']}]" if s.get("subset") else "") + f" ({s['split']})"
        lines.append(f"  source {where}: {s['examples']:,} examples")
    ev = stats.get("eval")
    if ev:
        lines.append(f"eval: {ev['num_examples']:,} examples, {ev['num_tokens']:,} tokens in {ev['num_rows']:,} rows")
        lines += [f"  {line}" for line in ev.get("drop_lines", [])]
        for s in ev.get("eval_sets", []):
            lines.append(f"  eval set {s['label']}: {s['examples']:,} examples, {s['tokens']:,} tokens")
    return lines


def prepare(spec_path: str, overrides: list[str], nodes: int | None, gpus: int | None) -> int:
    """`distsft prepare`: validate, plan the batch arithmetic, build the caches, print the figures."""
    from distsft.data.cache import default_cache_root
    from distsft.plan.report import make_plan
    from distsft.config.spec import load_spec
    spec = load_spec(spec_path, overrides, nodes=nodes, gpus=gpus)
    make_plan(spec)
    stats = build_caches(spec)
    make_plan(spec, stats["train"])  # too little data for one global batch is an error here too
    print("\n".join(describe(stats)))
    print(f"cache: {default_cache_root(spec)}")
    return 0
