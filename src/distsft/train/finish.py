"""The end of a rank's run, and rank 0's records around it: the run record and plan plots at the start,
then the final save, the summary and the loss plots, or the preemption exit."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from distsft import rundir
from distsft.checkpoint.preempt import EXIT_PREEMPTED, mark_preempted
from distsft.runtime import dist


def record_start(r: Any) -> None:
    """One line per start in run_record.jsonl (rank 0): who ran, how, and what it resumed from."""
    e, b = dist.env(), r.batch
    rec = dict(e.record(), time=time.time(), pid=os.getpid(), writer_rank=e.rank,
               global_batch_size=b.global_batch_size, gradient_accumulation_steps=b.gradient_accumulation_steps,
               resumed_from=r.resume.name if r.resume else None, num_rows=r.stats["num_rows"],
               run_name=rundir.run_name(r.spec), optim=r.spec.train.optim,
               sequence_parallel_size=b.sequence_parallel_size, data_parallel_size=b.data_parallel_size,
               # the resume guard lets the layout change (checkpoint.resume); the record says it did
               resumed_sequence_parallel_size=getattr(r.marker, "sequence_parallel_size", None) if r.marker
               else None)
    with open(r.out / rundir.RUN_RECORD, "a") as f:
        f.write(json.dumps(rec) + "\n")


def plan_plots(r: Any) -> None:
    """The LR schedule and the length histogram next to run.yaml, drawn here (whatever started the
    ranks) from the step counts training will use."""
    from distsft.observe.plots import plan_plots as draw
    try:
        draw(r.spec, r.total_steps, r.args.warmup_steps, r.stats)
    except Exception as exc:  # noqa: BLE001 - a plot must never stop a run
        dist.warn(f"plan plots not drawn: {exc}")


def finish(r: Any) -> int:
    """After trainer.train(): nothing saved from a NaN/inf state (the advice was printed); after a
    preemption the PREEMPTED mark and exit 75; else the final model (adapter or full, with the
    tokenizer), the merged copy when asked, and rank 0's summary and loss plots."""
    e, spec, trainer = dist.env(), r.spec, r.trainer
    if r.diagnostics.failed:
        return 1
    step = trainer.state.global_step
    if r.ctx.preempted:
        if e.is_main:
            mark_preempted(r.out, step)
        dist.print0(f"stopped on a signal after saving checkpoint-{step}; rerun the same command to resume")
        return EXIT_PREEMPTED
    if spec.data.has_eval and not spec.train.eval_steps and step > 0:
        trainer.evaluate()  # eval sets without train.eval_steps: once, at the end (all ranks: a collective)
    if spec.distributed.backend == "fsdp":
        from distsft.train.fsdp import save_consolidated
        save_consolidated(trainer, str(r.out), r.precision)  # checkpoints are sharded; the final model is not
    else:
        trainer.save_model(str(r.out))
    # The last collective: once the model is on disk every rank may leave. What follows is rank 0's
    # alone (the merge can take longer than the collective timeout at 70B, and the other ranks no
    # longer wait for it in a barrier that would time out and take rank 0 down with them).
    dist.barrier()
    if e.is_main:
        if spec.checkpoint.save_merged and spec.peft.method != "none":
            import torch
            from distsft.train.model import save_merged
            save_merged(str(r.out), str(r.out / rundir.MERGED), torch.bfloat16 if r.precision == "bf16" else torch.float32)
            r.tokenizer.save_pretrained(str(r.out / rundir.MERGED))  # with the trained chat_template.jinja
        if spec.peft.method != "none" and r.stop_ids:  # an adapter's save writes no generation_config
            from distsft.train.stops import write_generation_config
            write_generation_config(trainer.model, r.out, r.out / rundir.MERGED)
        _summary(r, step)
        _record_throughput(r)
        from distsft.observe.plots import run_end_plots
        for path in run_end_plots(r.out, r.ctx.history):
            print(f"  plot             {path}", flush=True)
    return 0


def _record_throughput(r: Any) -> None:
    """This run's measured tokens/s per GPU, for the next `distsft plan` of the same model on the same
    hardware (plan.estimate reads OUTPUT_DIR/throughput.jsonl)."""
    from distsft.plan import estimate
    from distsft.runtime.hardware import device_name
    world = r.batch.world_size
    tps = estimate.measured_throughput([h for h in r.ctx.history if "loss" in h], world)
    if tps:
        estimate.append_record(r.out, estimate.make_record(r.spec, "run", device_name(), world, tps,
                                                           r.batch.per_device_train_batch_size))


def _summary(r: Any, steps: int) -> None:
    history = r.ctx.history
    train = [h for h in history if "loss" in h]
    evals = [h for h in history if "eval_loss" in h]
    tps = [h["tokens_per_second"] for h in train if h.get("tokens_per_second")]
    lines = ["", "run complete",
             f"  steps            {steps}" + ("" if train else " (already complete: nothing left to train)"),
             f"  loss             {train[0]['loss']:.4f} (first) → {train[-1]['loss']:.4f} (last)" if train else "",
             f"  eval loss        {evals[-1]['eval_loss']:.4f}" if evals else "",
             f"  tokens/s         {sum(tps) / len(tps):,.0f} (mean over logging steps)" if tps else "",
             f"  wall time        {time.time() - r.started:,.1f} s",
             f"  outputs          {r.out}/ ({'adapter' if r.spec.peft.method != 'none' else 'model'}, tokenizer, "
             "metrics.jsonl, checkpoints)"]
    print("\n".join(line for line in lines if line), flush=True)
