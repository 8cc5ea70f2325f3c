"""What every rank runs: resolved run.yaml → data, model, TRL SFTTrainer → outputs.

Exit codes: 0 done; 2 bad spec/data (one message); 75 stopped on a signal after a complete checkpoint
(rerun the same command to resume); 1 anything else (a NaN/inf loss included, with advice).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import checkpoint, dist, hardware, shared_view, universal
from .resume import check_data_unchanged, decide as decide_resume, train_data_key
from .checkpoint import EXIT_PREEMPTED
from .spec import RunSpec, SpecError, load_spec


def row_checksum(input_ids: Any) -> int:
    """A content fingerprint of one packed row. Summed over a step's rows on all ranks it identifies
    which samples the step consumed (logged as batch_checksum), whatever the process count."""
    import numpy as np
    ids = np.asarray(input_ids, dtype=np.int64)
    return int((ids * (np.arange(len(ids)) % 7919 + 1)).sum() % 1_000_003)


def cache_root(spec: RunSpec) -> Path:
    from .data.cache import default_cache_root
    return default_cache_root(spec)


def prepare_split(spec: RunSpec, tokenizer: Any, split: str) -> tuple[Any, dict[str, Any]]:
    """Tokenize + mask + pack once: usually `distsft run`/`submit`/`prepare` built the cache already and
    this memory-maps it. When it is missing (another host's cache directory, --no-prepare), each node's
    first rank builds it while the node's other ranks wait on the file system -- never in a collective,
    whose timeout a long build would exceed."""
    from . import data
    from .data import cache as data_cache
    e, root = dist.env(), cache_root(spec)
    key = data_cache.cache_key(spec, tokenizer, split)
    found = data_cache.load_cached(root, key)
    if found is None and e.is_local_main:
        if e.world_size > 1:
            dist.warn(f"rank {e.rank}: the {split} data cache is missing in {root}; building it on this node "
                      "(run `distsft prepare` first to build it once, before the job)")
        found = data.build(spec, tokenizer, split, root)
    elif found is None:
        found = _wait_for_cache(root, key, split)
    if e.is_local_main:
        data_cache.remember(spec, split, root, key)  # lets the next `distsft run` skip the tokenizer
    return found


def _wait_for_cache(root: Path, key: str, split: str, poll_s: float = 2.0) -> tuple[Any, dict[str, Any]]:
    """Poll for the cache the node's first rank is building. If that rank fails, the launcher
    (torchrun, srun --kill-on-bad-exit) stops this one."""
    from .data import cache as data_cache
    while True:
        found = data_cache.load_cached(root, key)
        if found is not None:
            return found
        time.sleep(poll_s)


def _configure_logging(e: dist.DistEnv) -> None:
    import transformers
    import datasets
    if not e.is_main:
        # Other ranks print only warnings and errors (prefixed by dist.warn).
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        datasets.logging.set_verbosity_error()
    from .console import no_progress_bars
    no_progress_bars()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(run_yaml: str, flag: checkpoint.PreemptionFlag | None = None) -> int:
    """Train one rank. `flag` lets a caller (the SLURM task) see which signals stopped training."""
    e = dist.env()
    from .console import quiet
    quiet()  # before bitsandbytes / transformers are imported
    # First thing: a preemption signal that arrives while the libraries load must not kill the rank.
    flag = (flag or checkpoint.PreemptionFlag()).install()
    try:
        spec = load_spec(run_yaml)
        return _train(spec, flag)
    except dist.AgreedError as exc:  # found by rank 0 for every rank: one message
        if e.is_main:
            dist.warn(f"error: {exc}")
        return 2
    except SpecError as exc:
        dist.warn(f"error: {exc}")
        return 2
    except checkpoint.DiskFullError as exc:
        dist.warn(f"error: {exc}")
        return 1
    except KeyboardInterrupt:
        dist.warn("interrupted")
        return 130
    except dist.PeerFailed as exc:
        dist.warn(f"rank {e.rank}: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - the last word from a rank must say which rank failed
        if "closed by peer" in str(exc) or "Connection reset" in str(exc):
            # A consequence, not a cause: another rank died; its own message (or the launcher) names it.
            dist.warn(f"rank {e.rank}: lost contact with another rank, which failed or was killed; stopping")
            return 1
        dist.warn(f"rank {e.rank} failed:\n{traceback.format_exc()}")
        return 1


def _train(spec: RunSpec, flag: checkpoint.PreemptionFlag) -> int:
    import torch
    from trl import SFTConfig
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from . import model as model_lib
    from .data.collate import PackedCollator
    from .metrics import MetricsWriter
    from .plan import batch_for, steps as plan_steps, warmup_steps
    from .schedules import scheduler_kwargs
    from .progress import Progress
    from .saves import SaveClock
    from .render import process_group_timeout_s, render_deepspeed, resolve_precision
    from .data.sampler import GlobalOrder
    from .trainer import DistSFTTrainer, PreemptionCallback, RunContext, SinkCallback
    from .diagnostics import Diagnostics
    from .generation import SampleGenerations

    e = dist.env()
    _configure_logging(e)
    out = Path(spec.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = checkpoint.OutputLock(out)

    cuda, bf16_ok, _ = hardware.cuda_info()
    precision = resolve_precision(spec, cuda, bf16_ok)
    attn = hardware.choose_attn(spec.model.attn_implementation)
    hardware.check_kernels(spec.model.use_liger_kernel)  # also when the ranks were started by hand
    from .optim import check_available
    check_available(spec.train.optim)
    batch = batch_for(spec, world_size=e.world_size)
    t = spec.train
    # The process group first, so that rank 0 decides for all ranks (lock, shared view, resume).
    dist.init_early(cuda, timeout_s=process_group_timeout_s(spec))
    dist.agree(lambda: None if dist.launcher_holds_lock() else lock.acquire())
    shared_view.check(out)
    if e.is_main:
        checkpoint.clear_preempted(out)  # this attempt, whatever happens to it, is not the preempted one
    resume, load_universal, marker = decide_resume(spec, out, batch, e.world_size)
    ds_config = render_deepspeed(spec, batch, precision) if spec.distributed.backend == "deepspeed" else None
    if load_universal:
        ds_config = universal.with_load_universal(ds_config)
        # Before any collective that could time out: a conversion longer than the collective timeout
        # cannot fail the job, since the other ranks watch the file system instead of waiting in a
        # barrier. If rank 0 fails, torchrun / srun --kill-on-bad-exit stop them. Usually `distsft run`
        # has converted before the ranks started, and this is a no-op.
        if e.is_main:
            universal.convert_if_needed(resume, e.world_size)
        else:
            universal.wait_converted(resume)

    fsdp_args: dict[str, Any] = {}
    if spec.distributed.backend == "fsdp":
        from . import fsdp
        fsdp.allow_cpu_fsdp()  # CPU ranks only; patches nothing where there is an accelerator
        # The layer classes are filled in from the loaded model (fsdp.wrap_layers_of) before the Trainer
        # builds accelerate's FSDP plugin from these arguments.
        fsdp_args = {"fsdp": True, "fsdp_config": fsdp.trainer_fsdp_config(spec, [])}
    args = SFTConfig(
        output_dir=str(out), per_device_train_batch_size=batch.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size or batch.per_device_train_batch_size,
        gradient_accumulation_steps=batch.gradient_accumulation_steps, learning_rate=float(t.learning_rate),
        lr_scheduler_type=t.lr_scheduler_type, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm,
        **_option_args(spec),
        seed=t.seed, data_seed=t.seed, bf16=precision == "bf16", fp16=precision == "fp16",
        # FSDP2 full fine-tuning checkpoints with FSDP's own wrapper instead (fsdp.accelerate_fsdp_config).
        **_checkpointing_args(_hf_checkpointing(spec)), **fsdp_args,
        logging_steps=spec.logging.logging_steps, report_to="none", disable_tqdm=True,
        save_strategy="steps" if spec.checkpoint.save_steps else "no", save_steps=spec.checkpoint.save_steps or 500,
        save_total_limit=None,  # distsft rotates, and never removes the newest complete checkpoint
        eval_strategy="steps" if (t.eval_steps and spec.data.has_eval) else "no", eval_steps=t.eval_steps,
        load_best_model_at_end=spec.checkpoint.load_best_at_end, metric_for_best_model="eval_loss",
        greater_is_better=False, ignore_data_skip=True, remove_unused_columns=False, packing=False,
        dataset_kwargs={"skip_prepare_dataset": True}, average_tokens_across_devices=True,
        use_cpu=not cuda, ddp_backend=None if cuda or e.world_size == 1 else "gloo", ddp_find_unused_parameters=False,
        deepspeed=ds_config,
        dataloader_num_workers=0, max_length=spec.data.max_length, save_only_model=False,
        ddp_timeout=process_group_timeout_s(spec),
    )
    device = args.device  # initialises the process group (gloo on CPU, NCCL on GPU)
    if spec.distributed.backend == "deepspeed" and e.world_size > 1:
        # ZeRO-3 partitions weights while from_pretrained loads them (zero.Init), which asks
        # deepspeed.comm for the world size: it must wrap the process group before the model loads.
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo",
                                   timeout=datetime.timedelta(seconds=process_group_timeout_s(spec)))
    dist.print0(f"distsft: world size {e.world_size} ({e.num_nodes} node(s)), "
                f"{'GPU' if cuda else 'CPU'} {'fp32' if precision == 'no' else precision}, attention {attn}, backend {spec.distributed.backend}"
                f"{' ZeRO-' + str(spec.distributed.stage) if spec.distributed.backend == 'deepspeed' else ''}"
                f"{' (FSDP2)' if spec.distributed.backend == 'fsdp' else ''}, "
                f"global batch {batch.global_batch_size} = {batch.per_device_train_batch_size} × "
                f"{batch.gradient_accumulation_steps} × {e.world_size}")

    tokenizer = model_lib.load_tokenizer(spec)
    # No collective around a build: a node's first rank builds a missing cache while the node's other
    # ranks poll the file system (prepare_split), so all of them reach the next collective together.
    train_ds, stats = prepare_split(spec, tokenizer, "train")
    eval_ds = _eval_sets(*prepare_split(spec, tokenizer, "eval")) if spec.data.has_eval else None
    data_key = train_data_key(spec, tokenizer)
    if marker is not None:
        dist.agree(lambda: check_data_unchanged(marker, data_key))
    # Too little data for one global batch is one message (rank 0's), not one per rank.
    steps_per_epoch, total = dist.agree(
        lambda: plan_steps(stats["num_rows"], batch.global_batch_size, t.num_train_epochs, t.max_steps))
    args.max_steps = total
    args.warmup_steps = warmup_steps(total, t.warmup_ratio)
    args.lr_scheduler_kwargs = scheduler_kwargs(t, total) or {}  # min-LR cosine / WSD need the step count
    order = GlobalOrder(stats["num_rows"], batch.global_batch_size, t.seed)

    resume_step = int(marker["step"]) if marker else 0
    writer = progress = None
    if e.is_main:
        writer = MetricsWriter(out, spec.logging.report_to, resume_step, spec=spec)
        _record_start(out, e, spec, batch, stats, resume)
        _plan_plots(spec, total, args.warmup_steps, stats)
    progress = Progress(total, enabled=e.is_main)
    ctx = RunContext(order=order, micro=batch.per_device_train_batch_size, accum=batch.gradient_accumulation_steps,
                     total_steps=total, eval_batch=args.per_device_eval_batch_size,
                     save_total_limit=spec.checkpoint.save_total_limit, flag=flag, writer=writer,
                     save_clock=SaveClock(spec.slurm.signal_delay_s),
                     marker_info={"global_batch_size": batch.global_batch_size, "seed": t.seed,
                                  "num_rows": stats["num_rows"], "backend": spec.distributed.backend,
                                  "zero_stage": spec.distributed.stage, "optim": t.optim, "data_key": data_key,
                                  "max_length": spec.data.max_length, "packing": spec.data.packing})

    from transformers import set_seed
    set_seed(t.seed)  # before the model: LoRA adapters are initialised randomly when they are attached
    model = model_lib.load_model(spec, precision, attn, device, tokenizer=tokenizer)
    if fsdp_args:
        dist.print0(f"fsdp: one FSDP2 unit per {', '.join(fsdp.wrap_layers_of(args, model))}")
    packed = PackedCollator(tokenizer.pad_token_id, attn)
    from .mfu import meter
    ctx.mfu = meter(model, e.world_size, device, spec.logging.peak_tflops, warn=dist.print0)

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        b = packed(rows)
        b["num_real_tokens"] = sum(int(sum(r["seq_lengths"])) for r in rows)
        b["batch_checksum"] = sum(row_checksum(r["input_ids"]) for r in rows)
        return b

    # Diagnostics after PreemptionCallback: it logs every save step, the preemption save included.
    diag = Diagnostics(spec, total, args.warmup_steps, steps_per_epoch=steps_per_epoch, writer=writer)
    callbacks = [PreemptionCallback(ctx, device), SinkCallback(ctx, progress), diag]
    if load_universal:
        callbacks.append(universal.resume_callback(resume))
    if spec.logging.generation_steps:
        callbacks.append(SampleGenerations(spec, tokenizer, writer))
    trainer = DistSFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tokenizer, data_collator=collate, ctx=ctx, callbacks=callbacks)
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    dist.print0(f"data: {stats['num_examples']} examples, {stats['num_tokens']} tokens in {stats['num_rows']} rows "
                f"(packing efficiency {stats['packing_efficiency']:.1%}); {steps_per_epoch} steps/epoch, "
                f"{total} steps" + (f"; resuming from {resume.name}" if resume else ""))
    started = time.time()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    progress.close()

    if diag.failed:  # NaN/inf: nothing saved from the broken state; the advice was printed
        _close(writer, lock)
        return 1
    if ctx.preempted:
        if e.is_main:
            checkpoint.mark_preempted(out, trainer.state.global_step)
        dist.print0(f"stopped on a signal after saving checkpoint-{trainer.state.global_step}; "
                    "rerun the same command to resume")
        _close(writer, lock)
        return EXIT_PREEMPTED
    # adapter (LoRA/QLoRA) or full model; the tokenizer goes with it
    if fsdp_args:
        fsdp.save_consolidated(trainer, str(out))  # checkpoints are sharded; the final model is not
    else:
        trainer.save_model(str(out))
    if e.is_main:
        if spec.checkpoint.save_merged and spec.peft.method != "none":
            model_lib.save_merged(str(out), str(out / "merged"), torch.bfloat16 if precision == "bf16" else torch.float32)
        _summary(out, ctx.history, started, spec, trainer.state.global_step)
        from .plots import run_end_plots
        for path in run_end_plots(out, ctx.history):
            print(f"  plot             {path}", flush=True)
    dist.barrier()
    _close(writer, lock)
    return 0


def _option_args(spec: RunSpec) -> dict[str, Any]:
    """Optimizer, kernels and run name, passed through to TRL/HF under their own names."""
    t = spec.train
    return {"optim": t.optim, "adam_beta1": t.adam_beta1, "adam_beta2": t.adam_beta2,
            "adam_epsilon": t.adam_epsilon, "torch_compile": t.torch_compile,
            "use_liger_kernel": spec.model.use_liger_kernel, "run_name": run_name(spec)}


def run_name(spec: RunSpec) -> str:
    return spec.logging.run_name or Path(spec.output_dir).name


def _hf_checkpointing(spec: RunSpec) -> bool:
    from .fsdp import uses_hf_checkpointing
    return uses_hf_checkpointing(spec)


def _eval_sets(ds: Any, stats: dict[str, Any]) -> Any:
    """The eval cache as the trainer takes it: one dataset, or {label: rows} when there are several sets
    (each set's rows are contiguous, see data.pack_write)."""
    sets = stats.get("eval_sets") or []
    if len(sets) <= 1:
        return ds
    return {s["label"]: ds.select(range(*s["rows"])) for s in sets}


def _checkpointing_args(enabled: bool) -> dict[str, Any]:
    """Gradient checkpointing exactly as the spec says (TRL's own default is on), with
    use_reentrant=False, under the name this transformers version uses."""
    from trl import SFTConfig
    name = "activation_checkpointing" if "activation_checkpointing" in SFTConfig.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def _record_start(out: Path, e: dist.DistEnv, spec: RunSpec, batch: Any, stats: dict[str, Any],
                  resume: Path | None) -> None:
    rec = dict(e.record(), time=time.time(), pid=os.getpid(), writer_rank=e.rank,
               global_batch_size=batch.global_batch_size, gradient_accumulation_steps=batch.gradient_accumulation_steps,
               resumed_from=resume.name if resume else None, num_rows=stats["num_rows"],
               run_name=run_name(spec), optim=spec.train.optim)
    with open(out / "run_record.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def _plan_plots(spec: RunSpec, total: int, warmup: int, stats: dict[str, Any]) -> None:
    """The LR schedule and the length histogram next to run.yaml, drawn here (whatever started the
    ranks) from the step counts training will use."""
    from .plots import plan_plots
    try:
        plan_plots(spec, total, warmup, stats)
    except Exception as exc:  # noqa: BLE001 - a plot must never stop a run
        dist.warn(f"plan plots not drawn: {exc}")


def _summary(out: Path, history: list[dict[str, Any]], started: float, spec: RunSpec, steps: int) -> None:
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    tps = [h["tokens_per_second"] for h in train if h.get("tokens_per_second")]
    lines = ["", "run complete",
             f"  steps            {steps}" + ("" if train else " (already complete: nothing left to train)"),
             f"  loss             {train[0]['loss']:.4f} (first) → {train[-1]['loss']:.4f} (last)" if train else "",
             f"  eval loss        {evals[-1]['eval_loss']:.4f}" if evals else "",
             f"  tokens/s         {sum(tps) / len(tps):,.0f} (mean over logging steps)" if tps else "",
             f"  wall time        {time.time() - started:,.1f} s",
             f"  outputs          {out}/ ({'adapter' if spec.peft.method != 'none' else 'model'}, tokenizer, "
             "metrics.jsonl, checkpoints)"]
    print("\n".join(line for line in lines if line), flush=True)


def _close(writer: Any, lock: checkpoint.OutputLock) -> None:
    if writer is not None:
        writer.close()
    lock.release()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: train.py RUN_DIR/run.yaml", file=sys.stderr)
        sys.exit(2)
    code = run(argv[0])
    if dist.initialized() and code in (0, 2, EXIT_PREEMPTED):  # 2: bad input, agreed by every rank
        # Exiting with a live gloo group sometimes aborts the process after the work is done.
        import torch.distributed as tdist
        tdist.destroy_process_group()
    sys.exit(code)
