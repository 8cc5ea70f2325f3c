"""`distsft sanity SPEC`: a 10–20 step dress rehearsal on a small subset before a long job.

Checks, each printed as PASS / WARN / FAIL: the loss masking (the first examples' rendered text with
the loss-carrying spans marked; each span must end where its turn's answer ends), that training runs (no out-of-memory), that the loss falls, and that generation works.
Exit 0 when nothing FAILs, 1 otherwise.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from distsft.config.spec import RunSpec, dump_spec, load_spec

STEPS = 15
SUBSET = 400
console = Console(highlight=False)


def check_masking(spec: RunSpec, n: int = 3) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """The first examples rendered with their loss-carrying text marked [[like this]], the verdicts
    (data.inspect: each labelled span holds its turn's answer and ends where it ends, and a second way
    of locating the spans agrees), and the data stats."""
    from distsft.data import build as data
    from distsft.train import tokens as tokens_lib
    from distsft.data.build import sample_records
    from distsft.data.inspect import check_records
    from distsft.data.split import cache_root
    tok = tokens_lib.load_tokenizer(spec)
    ds, stats = data.load_or_build(spec, tok, "train", cache_root(spec))
    pairs, d = sample_records(spec, n)

    results = check_records(tok, d, pairs, show=lambda t: console.print(escape(t), highlight=False))
    share = stats["num_loss_tokens"] / max(1, stats["num_tokens"])
    if share >= 1.0 and spec.data.format != "text":
        results.append(("FAIL", "every token carries loss (masking is off)"))
    if not any(v == "FAIL" for v, _ in results):
        results.append(("PASS", f"assistant-only loss: {share:.0%} of {stats['num_tokens']:,} tokens carry loss; each "
                                "labelled span ends where its turn's answer ends"))
    return results, stats


def _sanity_spec(spec: RunSpec, out: Path) -> RunSpec:
    s = spec.model_copy(deep=True)
    s.output_dir = str(out)
    s.data.max_train_examples = min(spec.data.max_train_examples or SUBSET, SUBSET)
    s.train.max_steps = STEPS
    s.train.warmup_ratio = 0.1
    s.train.eval_steps = None
    s.data.eval_files = []
    s.checkpoint.save_steps = None
    s.checkpoint.resume = "never"
    s.checkpoint.load_best_at_end = False
    s.checkpoint.save_merged = False
    s.logging.logging_steps = 1
    s.logging.report_to = ["jsonl"]
    s.logging.generation_steps = STEPS
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
        console.print(f"[dim]sanity: {tps:,.0f} tokens/s per GPU recorded in {user.output_dir} for `distsft plan`[/]")


def run_sanity(spec_path: str, overrides: list[str], gpus: int | None) -> int:
    from distsft.launch import local as launcher
    from distsft.observe.metrics import read_metrics
    user = load_spec(spec_path, overrides, gpus=gpus)
    out = Path(tempfile.mkdtemp(prefix="distsft-sanity-"))
    spec = _sanity_spec(user, out / "run")
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
    console.print(f"[dim]sanity: {STEPS} steps on {spec.data.max_train_examples} examples in {out}[/]")
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
        console.print(f"[bold {colour[verdict]}]{verdict}[/] {escape(msg)}")
    failed = any(v == "FAIL" for v, _ in results)
    if not failed:
        shutil.rmtree(out, ignore_errors=True)
    return 1 if failed else 0
