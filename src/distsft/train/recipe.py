"""What every rank runs: resolved run.yaml → data, model, TRL SFTTrainer → outputs, as named phases.

    machine_and_options → claim_output_dir → resume_decision → load_data → training_arguments
        → build_model → confirm_micro_batch → build_trainer → trainer.train() → finish

Each phase is a function of what the earlier ones built (kept on one `Rank`, torchtitan-style), and
its docstring says why it comes where it does. Only `finish` writes outputs; only rank 0 logs (the
writer exists on rank 0 alone, so no phase tests the rank to decide whether to write).

Exit codes: 0 done; 2 bad spec/data (one message); 75 stopped on a signal after a complete checkpoint
(rerun the same command to resume); 1 anything else (a NaN/inf loss included, with advice).
"""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distsft.checkpoint import shared_view, store, universal
from distsft.checkpoint.lock import OutputLock
from distsft.checkpoint.preempt import EXIT_PREEMPTED, PreemptionFlag, clear_preempted
from distsft.checkpoint.resume import check_data_unchanged, decide, train_data_key
from distsft.config.spec import RunSpec, load_spec
from distsft.errors import SpecError
from distsft.runtime import dist, hardware


@dataclass
class Rank:
    """What the phases build, in the order they build it."""
    spec: RunSpec
    flag: PreemptionFlag
    out: Path
    # machine_and_options
    cuda: bool = False
    precision: str = "no"
    attn: str = "sdpa"
    batch: Any = None
    # claim_output_dir
    lock: OutputLock | None = None
    # resume_decision
    resume: Path | None = None
    load_universal: bool = False
    marker: store.Marker | None = None
    # load_data
    tokenizer: Any = None
    train_ds: Any = None
    eval_ds: Any = None
    stats: dict[str, Any] | None = None
    data_key: str | None = None
    steps_per_epoch: int = 0
    total_steps: int = 0
    # training_arguments
    args: Any = None
    device: Any = None
    # build_model / build_trainer
    model: Any = None
    stop_ids: list[int] | None = None  # generation_config.eos_token_id with the template's end of turn
    trainer: Any = None
    ctx: Any = None
    writer: Any = None
    progress: Any = None
    diagnostics: Any = None
    started: float = 0.0  # when trainer.train() began (the summary's wall time)


def run_rank(run_yaml: str, flag: PreemptionFlag | None = None) -> int:
    """Train one rank and return its exit code. `flag` lets a caller (the SLURM task) see which signals
    stopped training."""
    e = dist.env()
    from distsft.runtime.console import quiet
    quiet()  # before bitsandbytes / transformers are imported
    # First thing: a preemption signal that arrives while the libraries load must not kill the rank.
    flag = (flag or PreemptionFlag()).install()
    try:
        return train(load_spec(run_yaml), flag)
    except dist.AgreedError as exc:  # found by rank 0 for every rank: one message
        if e.is_main:
            dist.warn(f"error: {exc}")
        return 2
    except SpecError as exc:
        dist.warn(f"error: {exc}")
        return 2
    except store.DiskFullError as exc:
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


def train(spec: RunSpec, flag: PreemptionFlag) -> int:
    r = Rank(spec=spec, flag=flag, out=Path(spec.output_dir))
    machine_and_options(r)
    claim_output_dir(r)
    try:
        resume_decision(r)
        load_data(r)
        training_arguments(r)
        build_model(r)
        confirm_micro_batch(r)
        build_trainer(r)
        r.started = time.time()
        r.trainer.train(resume_from_checkpoint=str(r.resume) if r.resume else None)
        r.progress.close()
        from distsft.train.finish import finish
        return finish(r)
    finally:
        if r.writer is not None:
            r.writer.close()
        if r.lock is not None:
            r.lock.release()


def machine_and_options(r: Rank) -> None:
    """First, because it needs nothing but this machine and fails fastest: the device this rank trains
    on (runtime.devices, before any library reads LOCAL_RANK), the precision and attention this machine runs, the preflight checks (the same list the launcher ran: ranks can be started by
    hand), and the batch arithmetic for this world size."""
    from distsft.plan.batch import batch_for
    from distsft.runtime.console import configure_logging
    from distsft.train import preflight
    from distsft.train.backend import resolve_precision
    from distsft.runtime.devices import setup_rank
    configure_logging(dist.env().is_main)
    # GPU or CPU, and which GPU, from what this rank sees (not what the launch host guessed).
    setup_rank(r.spec.distributed.backend)
    e = dist.env()
    r.cuda, bf16_ok, _ = hardware.cuda_info()
    r.precision = resolve_precision(r.spec, r.cuda, bf16_ok)
    r.attn = preflight.check(r.spec)
    r.batch = batch_for(r.spec, world_size=e.world_size)


def claim_output_dir(r: Rank) -> None:
    """Before anything reads or writes OUTPUT_DIR: the early process group (so rank 0 decides for every
    rank from here on), the output-dir lock (unless `distsft run` holds it for its ranks), the check that
    every node sees the same directory, and clearing PREEMPTED (this attempt, whatever happens to it, is
    not the preempted one)."""
    from distsft.train.backend import process_group_timeout_s
    r.out.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(r.out)
    dist.init_early(r.cuda, timeout_s=process_group_timeout_s(r.spec))
    dist.agree(lambda: None if dist.launcher_holds_lock() else lock.acquire())
    r.lock = lock
    shared_view.check(r.out)
    if dist.env().is_main:
        clear_preempted(r.out)


def resume_decision(r: Rank) -> None:
    """Rank 0's one decision for every rank, before the data: a checkpoint from another world size may
    need a universal conversion, which must finish before any collective that could time out (the other
    ranks watch the file system instead of waiting in a barrier; `distsft run` usually converted already)."""
    r.resume, r.load_universal, r.marker = decide(r.spec, r.out, r.batch, dist.env().world_size)
    if r.load_universal:
        if dist.env().is_main:
            universal.convert_if_needed(r.resume, dist.env().world_size)
        else:
            universal.wait_converted(r.resume)


def load_data(r: Rank) -> None:
    """Before the training arguments, so they are built complete (steps, warmup, schedule) instead of
    patched. No collective around a build: a node's first rank builds a missing cache while the node's
    other ranks poll the file system (data.split), so all of them reach the next collective together."""
    from distsft.data.split import eval_sets, prepare_split
    from distsft.plan.batch import steps
    from distsft.data.templates import apply_to_tokenizer
    from distsft.train.tokens import load_tokenizer
    spec, t = r.spec, r.spec.train
    r.tokenizer = load_tokenizer(spec)
    # The trained template becomes the tokenizer's: every save (output_dir, checkpoints) carries it.
    apply_to_tokenizer(r.tokenizer, spec.data.chat_template)
    r.train_ds, r.stats = prepare_split(spec, r.tokenizer, "train")
    r.eval_ds = eval_sets(*prepare_split(spec, r.tokenizer, "eval")) if spec.data.has_eval else None
    r.data_key = train_data_key(spec, r.tokenizer)
    if r.marker is not None:
        dist.agree(lambda: check_data_unchanged(r.marker, r.data_key))
    # Too little data for one global batch is one message (rank 0's), not one per rank.
    r.steps_per_epoch, r.total_steps = dist.agree(
        lambda: steps(r.stats["num_rows"], r.batch.global_batch_size, t.num_train_epochs, t.max_steps,
                      r.stats.get("drops_explained", "")))


def training_arguments(r: Rank) -> None:
    """TRL's SFTConfig, complete; reading `args.device` then initialises accelerate's state on the group
    claim_output_dir formed. DeepSpeed wraps the group before the model loads, since ZeRO-3 partitions
    weights while from_pretrained loads them (zero.Init) and asks deepspeed.comm for the world size."""
    from distsft.train.arguments import sft_config
    from distsft.train.backend import process_group_timeout_s
    r.args = sft_config(r)
    r.device = r.args.device
    spec, e = r.spec, dist.env()
    if spec.distributed.backend == "deepspeed" and e.world_size > 1:
        import deepspeed
        deepspeed.init_distributed(dist_backend="nccl" if r.cuda else "gloo",
                                   timeout=datetime.timedelta(seconds=process_group_timeout_s(spec)))
    b = r.batch
    dist.print0(f"distsft: world size {e.world_size} ({e.num_nodes} node(s)), "
                f"{'GPU' if r.cuda else 'CPU'} {'fp32' if r.precision == 'no' else r.precision}, attention {r.attn}, "
                f"backend {spec.distributed.backend}"
                f"{' ZeRO-' + str(spec.distributed.stage) if spec.distributed.backend == 'deepspeed' else ''}"
                f"{' (FSDP2)' if spec.distributed.backend == 'fsdp' else ''}, "
                f"global batch {b.global_batch_size} = {b.per_device_train_batch_size} × "
                f"{b.gradient_accumulation_steps} × {b.data_parallel_size}"
                + (f" (sequence parallel: {b.sequence_parallel_size} GPUs per sequence)"
                   if b.sequence_parallel_size > 1 else ""))


def build_model(r: Rank) -> None:
    """After the arguments (FSDP2's plugin settings and DeepSpeed's zero.Init must exist when the weights
    load); the seed first, since LoRA adapters are initialised randomly when they are attached."""
    from transformers import set_seed
    from distsft.train.model import load_model
    set_seed(r.spec.train.seed)
    r.model = load_model(r.spec, r.precision, r.attn, r.device, tokenizer=r.tokenizer)
    from distsft.train.stops import carry_turn_end
    r.stop_ids = carry_turn_end(r.model, r.tokenizer, r.spec)  # stop where the template ends turns
    from distsft.train.moe import attention_of
    r.attn = attention_of(r.model, r.attn)  # gpt-oss has no sdpa path: auto loads it with eager
    if r.spec.distributed.backend == "fsdp":
        from distsft.train.fsdp import wrap_layers_of
        dist.print0(f"fsdp: one FSDP2 unit per {', '.join(wrap_layers_of(r.args, r.model, r.precision))}")


def confirm_micro_batch(r: Rank) -> None:
    """After the model (the probe runs it) and before the trainer (which takes the micro-batch):
    `per_device_train_batch_size: auto` confirmed on the GPU (train.autobatch.settle)."""
    from distsft.train import autobatch
    autobatch.settle(r, lambda: _collator(r)[0])


def build_trainer(r: Rank) -> None:
    """Last, from everything above: the run context, rank 0's metrics writer and run record, the
    callbacks (diagnostics after PreemptionCallback: it logs every save step, the preemption save too)."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from distsft.data.collate import row_checksum
    from distsft.data.sampler import GlobalOrder
    from distsft.checkpoint.saves import SaveClock
    from distsft.observe.mfu import meter
    from distsft.observe.progress import Progress
    from distsft.train.diagnostics import Diagnostics
    from distsft.train.finish import plan_plots, record_start
    from distsft.train.generation import SampleGenerations
    from distsft.train.step_sync import StepWindow
    import numpy as np
    from distsft.train.trainer import DistSFTTrainer, PreemptionCallback, RunContext, SinkCallback
    spec, t, b, e, stats = r.spec, r.spec.train, r.batch, dist.env(), r.stats
    resume_step = r.marker.step if r.marker else 0
    if e.is_main:
        from distsft.observe.metrics import MetricsWriter
        r.writer = MetricsWriter(r.out, spec.logging.report_to, resume_step, spec=spec)
        record_start(r)
        plan_plots(r)
    r.progress = Progress(r.total_steps, enabled=e.is_main)
    marker = store.Marker(step=0, global_batch_size=b.global_batch_size, seed=t.seed, num_rows=stats["num_rows"],
                          backend=spec.distributed.backend, zero_stage=spec.distributed.stage, optim=t.optim,
                          data_key=r.data_key, max_length=spec.data.max_length, packing=spec.data.packing,
                          sequence_parallel_size=b.sequence_parallel_size)
    r.ctx = RunContext(order=GlobalOrder(stats["num_rows"], b.global_batch_size, t.seed),
                       micro=b.per_device_train_batch_size, accum=b.gradient_accumulation_steps,
                       total_steps=r.total_steps, eval_batch=r.args.per_device_eval_batch_size,
                       save_total_limit=spec.checkpoint.save_total_limit, flag=r.flag, writer=r.writer,
                       save_clock=SaveClock(spec.slurm.signal_delay_s), marker=marker)
    if b.sequence_parallel_size > 1:
        from distsft.train.seqpar import Layout
        r.ctx.seqpar = Layout(e.world_size, e.rank, b.sequence_parallel_size)
        if spec.distributed.backend == "fsdp":  # ring attention: accelerate shards the rows itself
            r.ctx.ring, r.ctx.seqpar = r.ctx.seqpar, None
    r.ctx.mfu = meter(r.model, e.world_size, r.device, spec.logging.peak_tflops, warn=dist.print0,
                      precision=r.precision)
    r.ctx.window, r.ctx.compiled = StepWindow(r.device), bool(t.torch_compile)
    from distsft.data.layer_masks import sliding_window_of, with_layer_masks
    from distsft.data.mixture import train_sources
    from distsft.data.source_ids import token_sources
    from distsft.train.losses import LossComputer
    packed, strip = _collator(r)
    single = r.batch.sequence_parallel_size == 1  # sequence parallelism keeps its own loss (train.seqpar)
    # Before the trainer: TRL's init rewrites the config's router_aux_loss_coef (arguments.loss_args).
    r.ctx.losses = LossComputer(r.model, t.loss_type, t.router_aux_loss_coef,
                                [s.spec.label for s in train_sources(spec)]) if single else None
    per_token = single and (bool(r.ctx.losses.labels) or r.ctx.losses.moe is not None)
    sliding = sliding_window_of(r.model.config) if single else None  # packed masks within sliding windows

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = strip(with_layer_masks(packed(rows), sliding))
        # Host counts for the logging window (step_sync): the trainer never reads them off the device.
        batch["num_real_tokens"] = sum(int(sum(row["seq_lengths"])) for row in rows)
        batch["batch_checksum"] = sum(row_checksum(row["input_ids"]) for row in rows)
        batch["num_rows"] = len(rows)  # rows, not micro-batches: flash attention concatenates them into one
        batch["num_loss_tokens"] = int(np.count_nonzero(batch["labels"].numpy()[..., 1:] != -100))
        if per_token:  # per-source losses, and the router loss over real tokens
            batch["source_ids"], batch["token_mask"] = token_sources(rows, tuple(batch["input_ids"].shape))
        return batch

    r.diagnostics = Diagnostics(spec, r.total_steps, r.args.warmup_steps, steps_per_epoch=r.steps_per_epoch,
                                writer=r.writer)
    callbacks = [PreemptionCallback(r.ctx, r.device), SinkCallback(r.ctx, r.progress), r.diagnostics]
    if r.load_universal:
        callbacks.append(universal.resume_callback(r.resume))
    if spec.logging.generation_steps:
        callbacks.append(SampleGenerations(spec, r.tokenizer, r.writer, pause=r.ctx.window.paused,
                                           autocast=lambda: r.trainer.accelerator.autocast()))
    r.trainer = DistSFTTrainer(model=r.model, args=r.args, train_dataset=r.train_ds, eval_dataset=r.eval_ds,
                               processing_class=r.tokenizer, data_collator=collate, ctx=r.ctx, callbacks=callbacks)
    for cb in (PrinterCallback, ProgressCallback):
        r.trainer.remove_callback(cb)
    dist.print0(f"data: {stats['num_examples']} examples, {stats['num_tokens']} tokens in {stats['num_rows']} rows "
                f"(packing efficiency {stats['packing_efficiency']:.1%}); {r.steps_per_epoch} steps/epoch, "
                f"{r.total_steps} steps" + (f"; resuming from {r.resume.name}" if r.resume else "") + _layout_change(r))
    for line in stats.get("drop_lines", []):
        dist.print0(f"data: {line}")
    if spec.data.has_eval and not spec.train.eval_steps:
        dist.print0("eval: no train.eval_steps, so the eval set is evaluated once, at the end of training")


def _layout_change(r: Rank) -> str:
    """The resume guard lets the sequence-parallel layout change (same global batch, same samples);
    say so where the resume is announced (run_record.jsonl records it too)."""
    was = getattr(r.marker, "sequence_parallel_size", None) if r.marker else None
    now = r.batch.sequence_parallel_size
    return f" (written at sequence_parallel_size {was}, continuing at {now})" if was and was != now else ""


def _collator(r: Rank) -> tuple[Any, Any]:
    """The packed collator, and what is done to its batches. Under sequence parallelism every row is
    padded to max_length rounded up to a multiple of the group size: each rank takes an equal shard, and
    DeepSpeed's Ulysses adapter all-gathers the group's batches, which gloo accepts only at one shape
    (the padding carries no loss). Only [B, L] tensors go to the adapter: the examples are kept apart in
    the attention from the gathered position_ids (train.seqpar), not by the collator's mask."""
    from distsft.data.collate import PackedCollator
    from distsft.train.model import derives_packed_masks
    S = r.batch.sequence_parallel_size
    if S == 1:
        r.attn = r.model.config._attn_implementation  # what the model got (auto: sdpa, or eager where no sdpa)
        return PackedCollator(r.tokenizer.pad_token_id, r.attn,
                              explicit_mask=not derives_packed_masks(r.model)), lambda batch: batch
    from distsft.config.seqpar import padded_length
    from distsft.train.seqpar import strip_for_ulysses
    width = padded_length(r.spec.data.max_length, S)
    return PackedCollator(r.tokenizer.pad_token_id, "sdpa", pad_to_multiple_of=width), strip_for_ulysses


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m distsft.train RUN_DIR/run.yaml", file=sys.stderr)
        sys.exit(2)
    code = run_rank(argv[0])
    if code == 2 or (code in (0, EXIT_PREEMPTED) and dist.initialized()):
        _leave(code)
    sys.exit(code)


def _leave(code: int) -> None:
    """End a rank whose work is done without the interpreter's teardown. Tearing down gloo's and
    DeepSpeed's communication threads at exit (or in destroy_process_group) sometimes aborts a rank
    after the run has finished ("terminate called without an active exception", SIGABRT: seen in CI
    after "run complete"), and the user would see a crash instead of the run's exit code. Exit 2 is bad
    input agreed by every rank; 0 and 75 wait for every rank first, so no rank leaves a collective
    another still needs. Everything a rank writes is closed by then (sinks, checkpoints, the lock)."""
    import logging
    if code != 2:
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - a peer that failed is reported by the launcher, with its code
            pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
