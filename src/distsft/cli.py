"""The `distsft` command: init, plan, render, run, submit, prepare, sanity, eval, export.

Every user-caused error (spec, data, command line) ends in one message and exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.table import Table

from distsft.errors import SpecError
from distsft.runtime.console import literal

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="One YAML run spec to a supervised fine-tuning job: locally or on SLURM.")
err = Console(stderr=True)

OVERRIDES = typer.Argument(None, help="overrides as section.key=value, e.g. train.learning_rate=1e-5",
                           show_default=False)
NODES = typer.Option(None, "--nodes", min=1, help="number of nodes (overrides distributed.nodes)")
GPUS = typer.Option(None, "--gpus", min=1, help="GPUs (or CPU processes) per node (overrides distributed.gpus_per_node)")


def _fail(msg: str) -> None:
    err.print(literal("error:", "bold red", msg), highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _exit_with(command: Any, *args: Any, **kwargs: Any) -> None:
    """Run a command that returns an exit code; a user mistake (SpecError) is one message and exit 2."""
    try:
        code = command(*args, **kwargs)
    except SpecError as exc:
        _fail(str(exc))
        return
    raise typer.Exit(code)


def _data_stats(spec: Any) -> tuple[dict[str, Any] | None, str | None]:
    """Tokenize and pack the data for the plan ({split: stats}). Only a hub model or dataset that is not
    cached here is "not read" (why); any other data error is the user's to fix (SpecError, exit 2)."""
    from distsft.errors import NotReachable
    try:
        from distsft.launch.prepare import build_caches
        # Local files and the HF cache only: a plan must not hang on hub retries when offline.
        return build_caches(spec, local_files_only=True), None
    except NotReachable as exc:
        return None, str(exc)


@app.command()
def plan(spec_path: Path = typer.Argument(..., metavar="SPEC"), overrides: Optional[list[str]] = OVERRIDES,
         nodes: Optional[int] = NODES, gpus: Optional[int] = GPUS,
         as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
         no_data: bool = typer.Option(False, "--no-data", help="skip reading the data")) -> None:
    """Validate the spec and show the plan: batch arithmetic, data, steps, memory."""
    from distsft.plan.report import hyperparameter_warnings, make_plan
    from distsft.config.spec import load_spec
    from distsft.runtime.offline import hub_offline
    hub_offline()  # local files and the HF cache only: no retries, no hub noise
    # Libraries print to stdout (DeepSpeed's accelerator notice); keep stdout for the plan itself.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            spec = load_spec(spec_path, overrides, nodes=nodes, gpus=gpus)
            make_plan(spec)  # batch errors first, before touching data
            all_stats, why = (None, "skipped (--no-data)") if no_data else _data_stats(spec)
            stats = all_stats["train"] if all_stats else None
            p = make_plan(spec, stats)
            from distsft.train.tokens import plan_warnings
            extra = plan_warnings(spec)  # template markers missing from the vocabulary (trl#1668)
            from distsft.train.stops import plan_warnings as stop_warnings
            extra += stop_warnings(spec)  # the template ends turns with a token generation does not stop on
            from distsft.runtime.hardware import device_name, kernel_warnings
            extra += kernel_warnings(spec.model.use_liger_kernel)
        except SpecError as exc:
            _fail(str(exc))
            return
        from distsft.plan.memory import estimate
        try:
            mem = estimate(spec, p)  # also refuses model options the model cannot take (MoE, target_parameters)
        except SpecError as exc:
            _fail(str(exc))
            return
        if mem:
            p.num_parameters = mem.get("num_parameters")
            p.num_active_parameters = mem.get("num_active_parameters")
            p.memory_gb_per_gpu = mem.get("per_stage_gb", {})
        # the recommended ranges for this model's size and method (plan.recommend), now that the size is
        # known; make_plan's other warnings (sequence layout, positions) stay
        sized = hyperparameter_warnings(spec, p)
        p.warnings = (hyperparameter_warnings(spec, p, p.num_parameters)
                      + [w for w in p.warnings if w not in sized] + extra)
        from distsft.plan.estimate import for_plan
        est = for_plan(spec, p, mem, device_name())
        p.estimate = est.to_json() if est else None
        if mem:  # does one checkpoint fit the USR2 window before the time limit? (plan.preempt_window)
            from distsft.plan.preempt_window import check as window
            p.warnings += [w for w in window(spec, mem.get("checkpoint")) if w]
        plots = _plots(spec, p, stats)
    if as_json:
        d = p.to_dict()
        d["memory"] = mem
        d["data_note"] = why
        d["plots"] = plots
        from distsft.launch.prepare import figures
        d.update(figures(all_stats) if all_stats else {"sources": None, "eval_sets": None})
        typer.echo(json.dumps(d, indent=1, default=str))
        return
    _print_plan(spec, p, mem, why, plots)
    if all_stats:
        from distsft.launch.prepare import describe
        Console().print("\n".join(describe(all_stats)), highlight=False, soft_wrap=True, markup=False)


def _plots(spec: Any, p: Any, stats: dict[str, Any] | None) -> list[str]:
    try:
        from distsft.observe.plots import plan_plots
    except ImportError:
        return []
    return [str(x) for x in plan_plots(spec, p.total_steps, p.warmup_steps, stats)]


def _gb(x: float) -> str:
    return f"{x:.1f}" if x >= 1 else f"{x:.3f}"


def _print_plan(spec: Any, p: Any, mem: dict[str, Any] | None, why: str | None, plots: list[str]) -> None:
    from distsft.config.schedules import final_lr_note
    out = Console()
    t = Table(title=f"distsft plan — {spec.model.name_or_path}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    fmt = lambda v: "—" if v is None else (f"{v:,}" if isinstance(v, int) else str(v))  # noqa: E731
    rows = [
        ("world", f"{p.nodes} node(s) × {p.gpus_per_node} GPU(s) = {p.world_size}"),
        ("backend", p.backend + (f" ZeRO-{p.zero_stage}" if p.backend == "deepspeed" else "")
         + (" (FSDP2)" if p.backend == "fsdp" else "")
         + (" + offload optimizer" if spec.distributed.offload_optimizer else "")
         + (" + offload params" if spec.distributed.offload_params else "")),
        ("global batch", f"{p.global_batch_size} = {p.per_device_train_batch_size} (micro) × "
                         f"{p.gradient_accumulation_steps} (accum) × "
                         + (f"{p.world_size} (GPUs)" if p.sequence_parallel_size == 1 else
                            f"{p.data_parallel_size} (data-parallel groups = {p.world_size} GPUs / "
                            f"{p.sequence_parallel_size})")),
        *([("sequence parallel", f"{p.sequence_parallel_size} GPUs per sequence, {p.data_parallel_size} data "
                                 f"parallel; {p.tokens_per_gpu_per_micro_batch:,} tokens per GPU per micro-batch, "
                                 f"activations ÷ {p.sequence_parallel_size} across the group")]
          if p.sequence_parallel_size > 1 else []),
        ("learning rate", f"{p.learning_rate:g} ({spec.train.lr_scheduler_type}{final_lr_note(spec.train)}, "
                          f"warmup {spec.train.warmup_ratio})"),
        ("optimizer", f"{spec.train.optim} (betas {spec.train.adam_beta1:g}, {spec.train.adam_beta2:g}; "
                      f"eps {spec.train.adam_epsilon:g})"),
        ("peft", spec.peft.method),
        ("examples", fmt(p.num_examples)), ("tokens", fmt(p.num_tokens)),
        ("packed rows", fmt(p.num_packed_rows) + (f"  (efficiency {p.packing_efficiency:.2%})"
                                                   if p.packing_efficiency is not None else "")),
        ("steps / epoch", fmt(p.steps_per_epoch)), ("total steps", fmt(p.total_steps)),
        ("warmup steps", fmt(p.warmup_steps)),
    ]
    if mem:
        active = mem.get("num_active_parameters", mem["num_parameters"])
        rows.append(("parameters", f"{mem['num_parameters']:,} ({mem.get('trainable_parameters', 0):,} trainable"
                                   + (f"; {active:,} active per token: mixture of experts)" if active != mem["num_parameters"] else ")")))
        rows.append(("memory / GPU", f"~{_gb(mem['total_gb'])} GB (estimate; model states "
                                     f"{_gb(mem['model_states_gb'])} + activations {_gb(mem['activations_gb'])})"))
        for label, gb in mem.get("per_stage_gb", {}).items():
            rows.append(("", f"{label}: {_gb(gb)} GB"))
        if mem.get("checkpoint"):
            c = mem["checkpoint"]
            rows.append(("checkpoint", f"~{_gb(c['per_rank_gb'])} GB per rank, ~{_gb(c['per_node_gb'])} GB per node "
                                       f"({c['backend']}; largest rank / node, one save)"))
            for label, size in c["per_backend"].items():
                rows.append(("", f"{label}: {_gb(size['per_rank_gb'])} GB / rank, {_gb(size['per_node_gb'])} GB / node"))
    if not mem:
        rows.append(("memory / GPU", "unknown (the model's config is not readable here)"))
    rows += _time_rows(p.estimate)
    for k, v in rows:
        t.add_row(k, v)
    out.print(t)
    if why:
        out.print(literal("data not read:", "yellow", why), soft_wrap=True)
    for w in p.warnings:
        out.print(literal("warning:", "yellow", w), soft_wrap=True)
    for f in plots:
        out.print(f"plot: {f}", markup=False)


def _time_rows(e: dict[str, Any] | None) -> list[tuple[str, str]]:
    from distsft.plan.estimate import duration
    if not e:
        return [("time", "unknown (neither the model's size nor a measured throughput is known here)")]
    rows = [("throughput", f"{e['tokens_per_second_per_gpu']:,.0f} tokens/s per GPU ({e['basis']})")]
    if e["hours"] is None:
        return rows + [("time", "unknown until the data is read (tokens to train)")]
    per_epoch = f"{duration(e['hours_per_epoch'])} per epoch, " if e.get("hours_per_epoch") else ""
    return rows + [("time", f"~{per_epoch}~{duration(e['hours'])} for the run, {e['gpu_hours']:,.1f} GPU-hours "
                            f"({e['source']})")]


@app.command()
def render(spec_path: Path = typer.Argument(..., metavar="SPEC"), overrides: Optional[list[str]] = OVERRIDES,
           nodes: Optional[int] = NODES, gpus: Optional[int] = GPUS,
           out: Path = typer.Option(..., "--out", help="directory for run.yaml, accelerate.yaml, deepspeed.json")) -> None:
    """Write the resolved spec and the Accelerate/DeepSpeed configs."""
    from distsft.runtime.hardware import cuda_info
    from distsft.plan.report import make_plan
    from distsft.launch.run_files import write_run_dir
    from distsft.config.spec import load_spec
    try:
        spec = load_spec(spec_path, overrides, nodes=nodes, gpus=gpus)
        make_plan(spec)
        cuda, bf16_ok, _ = cuda_info()
        paths = write_run_dir(spec, out, cuda=cuda, bf16_supported=bf16_ok)
    except SpecError as exc:
        _fail(str(exc))
        return
    for p in paths.values():
        typer.echo(str(p))


@app.command(context_settings={"allow_extra_args": False})
def run(spec_path: Path = typer.Argument(..., metavar="SPEC"), overrides: Optional[list[str]] = OVERRIDES,
        gpus: Optional[int] = GPUS) -> None:
    """Train on this machine (accelerate launch); CPU processes over gloo when there is no CUDA.
    Rerunning the same command resumes from the newest complete checkpoint."""
    from distsft.launch.local import run as run_local
    _exit_with(run_local, str(spec_path), overrides or [], gpus)


@app.command()
def submit(spec_path: Path = typer.Argument(..., metavar="SPEC"), overrides: Optional[list[str]] = OVERRIDES,
           nodes: Optional[int] = NODES, gpus: Optional[int] = GPUS,
           partition: Optional[str] = typer.Option(None, "--partition"),
           account: Optional[str] = typer.Option(None, "--account"),
           qos: Optional[str] = typer.Option(None, "--qos"),
           time_min: Optional[int] = typer.Option(None, "--time", min=1, help="time limit in minutes"),
           constraint: Optional[str] = typer.Option(None, "--constraint"),
           wait: bool = typer.Option(False, "--wait", help="follow rank 0's log; exit with the job's outcome"),
           dry_run: bool = typer.Option(False, "--dry-run", help="print the sbatch script and command only"),
           no_prepare: bool = typer.Option(False, "--no-prepare",
                                           help="do not build the data caches here; the job's ranks build them")) -> None:
    """Submit to SLURM through submitit: validated, planned and the data prepared on this host first."""
    from distsft.launch.slurm import submit as submit_job
    extra = [f"slurm.{k}={v}" for k, v in (("partition", partition), ("account", account), ("qos", qos),
                                            ("time_min", time_min), ("constraint", constraint)) if v is not None]
    _exit_with(submit_job, str(spec_path), (overrides or []) + extra, nodes=nodes, gpus=gpus, wait=wait,
               dry_run=dry_run, prepare=not no_prepare)


@app.command()
def prepare(spec_path: Path = typer.Argument(..., metavar="SPEC"), overrides: Optional[list[str]] = OVERRIDES,
            nodes: Optional[int] = NODES, gpus: Optional[int] = GPUS) -> None:
    """Build the train and eval data caches now (before any job) and print the data figures."""
    from distsft.launch.prepare import prepare as run_prepare
    _exit_with(run_prepare, str(spec_path), overrides or [], nodes, gpus)


@app.command()
def sanity(spec_path: Path = typer.Argument(..., metavar="SPEC"), overrides: Optional[list[str]] = OVERRIDES,
           gpus: Optional[int] = GPUS,
           steps: int = typer.Option(15, "--steps", min=1, help="optimizer steps of the rehearsal")) -> None:
    """N steps (15) on a subset of every source: masking, falling loss, generation. PASS/WARN lines; exit 0 or 1."""
    from distsft.sanity import run_sanity
    _exit_with(run_sanity, str(spec_path), overrides or [], gpus, steps)


@app.command()
def init(model: str = typer.Option(..., "--model", help="a bundled family's hub id or name (e.g. Qwen/Qwen2.5-7B-Instruct), "
                                                    "a hub id, or a local model directory with config.json"),
         method: str = typer.Option("full", "--method", help="full, lora or qlora"),
         nodes: int = typer.Option(1, "--nodes", min=1), gpus: int = typer.Option(1, "--gpus", min=1),
         gpu_memory_gb: Optional[float] = typer.Option(None, "--gpu-memory-gb", help="GB per GPU (default: this "
                                                       "machine's GPU, else 80)"),
         data: Optional[list[str]] = typer.Option(None, "--data", help="training data file(s); format sniffed"),
         out: Path = typer.Option(Path("run.yaml"), "--out", help="where to write the spec")) -> None:
    """Write a commented spec for a model: hyperparameters by size and method, a backend and micro-batch that fit."""
    from distsft.launch.init import run as run_init
    _exit_with(run_init, model, method, nodes, gpus, gpu_memory_gb, data, str(out))


CHECKPOINT = typer.Option(None, "--checkpoint", help="final (default), best, or a step N (checkpoint-N)")


@app.command("eval")
def eval_(run_dir: Path = typer.Argument(..., metavar="RUN_DIR"), overrides: Optional[list[str]] = OVERRIDES,
          checkpoint: Optional[str] = CHECKPOINT,
          tasks: Optional[str] = typer.Option(None, "--tasks", help="lm-eval tasks a,b (default: eval.tasks)")) -> None:
    """lm-evaluation-harness on a checkpoint: RUN_DIR/eval/<checkpoint>/results.json and eval/<task>/<metric>
    in the run's metrics."""
    from distsft.posttrain.command import eval_command
    _exit_with(eval_command, str(run_dir), checkpoint, tasks, overrides)


@app.command()
def export(run_dir: Path = typer.Argument(..., metavar="RUN_DIR"), overrides: Optional[list[str]] = OVERRIDES,
           out: Optional[Path] = typer.Option(None, "--out", help="the export directory"),
           checkpoint: Optional[str] = CHECKPOINT,
           merge: bool = typer.Option(False, "--merge", help="merge a LoRA/QLoRA adapter into its base"),
           dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | bfloat16 | float16 (default: as trained)"),
           push_to_hub: Optional[str] = typer.Option(None, "--push-to-hub", metavar="REPO", help="upload to user/name (HF_TOKEN)"),
           private: bool = typer.Option(False, "--private", help="create the hub repository private"),
           overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty --out"),
           check: bool = typer.Option(False, "--check", help="verify an existing export against the run"),
           max_shard_size: Optional[str] = typer.Option(None, "--max-shard-size", help="largest safetensors file (2GB)")) -> None:
    """HF safetensors from a checkpoint of any backend, verified by reloading it; 1 when it does not match."""
    from distsft.posttrain.command import export_command
    from distsft.runtime.envvars import hf_token
    _exit_with(export_command, str(run_dir), str(out) if out else None, checkpoint, merge, dtype, push_to_hub,
               private, overwrite, check, hf_token() if push_to_hub else None, max_shard_size, overrides)



def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
