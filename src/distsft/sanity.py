"""`distsft sanity SPEC [--steps N]`: an N-step (default 15) dress rehearsal on a small subset before a
long job.

The subset is drawn from every training source in proportion to its size (at least one example each,
seeded), not the first examples of the first source. Checks, each printed as PASS / WARN / FAIL: the
loss masking (examples from every source, named, rendered with the loss-carrying spans marked; each
span must end where its turn's answer ends), that training runs (no out-of-memory), that the loss
falls, and that generation works. Exit 0 when nothing FAILs, 1 otherwise. Its temporary directory is
removed on every exit (a failure, an error, Ctrl-C).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from distsft.config.spec import RunSpec, dump_spec, load_spec

from distsft.config.sections import DataSpec
from distsft.runtime.console import literal

STEPS = 15
SUBSET = 400
console = Console(highlight=False)


def check_masking(spec: RunSpec, n: int = 3) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """Examples from every source rendered with their loss-carrying text marked [[like this]], the verdicts
    (data.inspect: each labelled span holds its turn's answer and ends where it ends, and a second way
    of locating the spans agrees), and the data stats."""
    from distsft.data import build as data
    from distsft.train import tokens as tokens_lib
    from distsft.data.build import sample_records
    from distsft.data.inspect import check_records
    from distsft.data.split import cache_root
    tok = tokens_lib.load_tokenizer(spec)
    ds, stats = data.load_or_build(spec, tok, "train", cache_root(spec))
    results: list[tuple[str, str]] = []
    shown = 0
    for name, pairs, d, mapping in sample_records(spec, n):
        results += check_records(tok, d, pairs, show=lambda t: console.print(t, highlight=False, markup=False),
                                 mapping=mapping, source=name, first=shown)
        shown += len(pairs)
    share = stats["num_loss_tokens"] / max(1, stats["num_tokens"])
    if share >= 1.0 and spec.data.format != "text":
        results.append(("FAIL", "every token carries loss (masking is off)"))
    if not any(v == "FAIL" for v, _ in results):
        results.append(("PASS", f"assistant-only loss: {share:.0%} of {stats['num_tokens']:,} tokens carry loss; each "
                                "labelled span ends where its turn's answer ends"))
    return results, stats


def _subset(spec: RunSpec) -> DataSpec:
    """data with every training source cut to its share of SUBSET examples (a seeded draw: `count`)."""
    from distsft.data import mixture
    from distsft.data.build import open_streams
    d = spec.data
    sizes = [s.selected() for s in open_streams(spec, "train")[0]]
    raw = d.model_dump()
    raw.update(eval_files=[], eval_sources=[], val_set_size=None, train_files=[])
    total = sum(sizes)
    sources = []
    for src, n in zip(mixture.train_sources(spec), sizes):
        k = n if total <= SUBSET else max(1, round(SUBSET * n / total))
        # dataset_info is already expanded into the other keys; dropped, so the subset's count stands
        own = {key: v for key, v in src.spec.model_dump().items() if key != "dataset_info"}
        sources.append({**own, "fraction": None, "count": k} if k != n else own)
    raw["sources"] = sources
    return DataSpec.model_validate(raw)


def _sanity_spec(spec: RunSpec, out: Path, steps: int = STEPS) -> RunSpec:
    s = spec.model_copy(deep=True)
    s.output_dir = str(out)
    s.data = _subset(spec)
    s.train.max_steps = steps
    s.train.warmup_ratio = 0.1
    s.train.eval_steps = None
    s.checkpoint.save_steps = None
    s.checkpoint.resume = "never"
    s.checkpoint.load_best_at_end = False
    s.checkpoint.save_merged = False
    s.logging.logging_steps = 1
    s.logging.report_to = ["jsonl"]
    s.logging.generation_steps = steps
    if not s.logging.generation_prompts:
        s.logging.generation_prompts = ["Hello! What can you do?"]
    return s


def _subset_batch(spec: RunSpec, rows: int) -> None:
    """Shrink the global batch when the subset cannot fill one step (the check, not the recipe)."""
    t, world = spec.train, spec.distributed.nodes * spec.distributed.gpus_per_node
    unit = t.per_device_train_batch_size * world
    if t.global_batch_size and rows < t.global_batch_size * 2:
        t.global_batch_size = max(unit, (rows // 2) // unit * unit)
    elif t.gradient_accumulation_steps and rows < unit * t.gradient_accumulation_steps * 2:
        t.gradient_accumulation_steps = max(1, rows // 2 // unit)


def _record_throughput(user: RunSpec, spec: RunSpec, recs: list[dict[str, Any]]) -> None:
    """The measured tokens/s per GPU into the user's output directory, where `plan` finds it for the
    time estimate (plan.estimate)."""
    from distsft.plan import estimate
    from distsft.runtime.hardware import device_name
    world = spec.distributed.nodes * spec.distributed.gpus_per_node
    tps = estimate.measured_throughput(recs, world)
    if tps:
        estimate.append_record(user.output_dir, estimate.make_record(
            spec, "sanity", device_name(), world, tps, int(spec.train.per_device_train_batch_size)))
        console.print(f"sanity: {tps:,.0f} tokens/s per GPU recorded in {user.output_dir} for `distsft plan`",
                      style="dim", markup=False, highlight=False)


def run_sanity(spec_path: str, overrides: list[str], gpus: int | None, steps: int = STEPS) -> int:
    user = load_spec(spec_path, overrides, gpus=gpus)
    out = Path(tempfile.mkdtemp(prefix="distsft-sanity-"))
    try:  # removed on every exit: PASS, FAIL, a user error (exit 2), Ctrl-C
        return _rehearse(user, out, gpus, steps)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _rehearse(user: RunSpec, out: Path, gpus: int | None, steps: int) -> int:
    from distsft.launch import local as launcher
    from distsft.observe.metrics import read_metrics
    spec = _sanity_spec(user, out / "run", steps)
    results, stats = check_masking(spec)
    from distsft.train.tokens import sanity_results
    results += sanity_results(spec)  # template markers missing from the vocabulary (trl#1668)
    from distsft.train.stops import sanity_results as stop_results
    results += stop_results(spec)  # the template ends turns with a token generation does not stop on
    if spec.train.per_device_train_batch_size == "auto":  # resolved once, for the subset's arithmetic
        from distsft.plan.batch import batch_for
        spec.train.per_device_train_batch_size = batch_for(spec).per_device_train_batch_size
    _subset_batch(spec, stats["num_rows"])
    spec_file = out / "sanity.yaml"
    dump_spec(spec, spec_file)
    per = ", ".join(f"{s['examples']:,} from {s['path']}" for s in stats.get("sources", []))
    console.print(f"sanity: {steps} steps on {stats['num_examples']:,} examples ({per})", style="dim", soft_wrap=True,
                  markup=False, highlight=False)
    code = launcher.run(str(spec_file), [], gpus)
    recs = read_metrics(spec.output_dir)
    losses = [r["loss"] for r in recs if "loss" in r]
    if code == 0:
        _record_throughput(user, spec, recs)
    if code != 0:
        results.append(("FAIL", f"training exited with code {code} (see the output above)"))
    else:
        results.append(("PASS", f"{len(losses)} steps ran, no out-of-memory; peak memory "
                                f"{max((r.get('peak_memory_gb', 0) for r in recs), default=0):.2f} GB per rank"))
    if len(losses) >= 6:
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        verdict = "PASS" if last < first else "WARN"
        results.append((verdict, f"loss {'falls' if last < first else 'does not fall'}: "
                                 f"{first:.4f} (first 3 steps) → {last:.4f} (last 3)"))
    gens = [g for r in recs for g in r.get("generations", [])]
    if gens and all(isinstance(g["completion"], str) for g in gens):
        results.append(("PASS", f"generation works: {gens[0]['prompt']!r} → {gens[0]['completion'][:80]!r}"))
    elif code == 0:
        results.append(("WARN", "no sample generation was recorded"))
    colour = {"PASS": "green", "WARN": "yellow", "FAIL": "red"}
    for verdict, msg in results:
        console.print(literal(verdict, f"bold {colour[verdict]}", msg))
    return 1 if any(v == "FAIL" for v, _ in results) else 0
