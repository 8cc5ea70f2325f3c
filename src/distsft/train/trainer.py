"""TRL's SFTTrainer with distsft's data order, token-weighted loss reporting, token-weighted eval,
complete-or-absent checkpoints and the per-step preemption agreement. It owns no training logic:
forward/backward, optimizer, scheduler, DDP/DeepSpeed and checkpoint contents are TRL's and HF's."""

from __future__ import annotations

import dataclasses
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import TrainerCallback
from trl import SFTTrainer

from distsft.checkpoint import store as checkpoint, saves
from distsft.checkpoint.preempt import PreemptionFlag
from distsft.runtime import dist
from distsft.data.sampler import GlobalOrder, StepBatchSampler, eval_shards
from distsft.train.eval_loss import token_loss_sum
from distsft.train.step_sync import PreemptionAgreement, StepWindow
from distsft import rundir


@dataclass
class RunContext:
    """What the trainer needs beyond TRL's arguments; built once by train.recipe."""
    order: GlobalOrder
    micro: int
    accum: int
    total_steps: int
    eval_batch: int
    save_total_limit: int | None
    marker: checkpoint.Marker  # this run's; each save fills in the step
    flag: PreemptionFlag
    writer: Any = None  # metrics.MetricsWriter on rank 0, None elsewhere
    preempted: bool = False
    save_clock: Any = None  # saves.SaveClock: save_seconds and the signal_delay_s warning
    history: list[dict[str, Any]] = field(default_factory=list)
    mfu: Any = None  # tokens/s -> model FLOPs utilisation (mfu.meter), on CUDA only
    seqpar: Any = None  # train.seqpar.Layout when distributed.sequence_parallel_size > 1 (Ulysses)
    ring: Any = None  # the same under FSDP2's ring attention: a group's ranks load the same rows
    window: Any = None  # step_sync.StepWindow: the logging window (made by the trainer when None)
    compiled: bool = False  # train.torch_compile: the first step's compilation is not throughput
    losses: Any = None  # train.losses.LossComputer: the training loss (loss_type, router loss, per source)


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB → GiB (Linux)


# Collated beside the model inputs for the loss only (recipe.build_trainer's collate).
PER_TOKEN_KEYS = ("source_ids", "token_mask")


class _StepLoader(DataLoader):
    def set_epoch(self, epoch: int) -> None:
        """The order is a function of the step (sampler.GlobalOrder); HF's epoch counter is not used."""


class DistSFTTrainer(SFTTrainer):
    def __init__(self, *args: Any, ctx: RunContext, **kwargs: Any):
        self.ctx = ctx
        super().__init__(*args, **kwargs)
        if ctx.seqpar is not None:
            self.loss_is_scaled_for_ga = True  # seqpar.scaled_group_loss divides by the whole step's tokens
        if ctx.window is None:
            ctx.window = StepWindow(self.args.device)
        if ctx.losses is not None and ctx.losses.moe is not None:
            # TRL's init set the config's coefficient to the 0.0 distsft passes it (arguments.loss_args);
            # the saved config keeps the model's own.
            self.model.config.get_text_config().router_aux_loss_coef = ctx.losses.moe.router_aux_loss_coef

    # ------------------------------------------------------------------ data
    def get_train_dataloader(self) -> DataLoader:
        e = dist.env()
        if self.ctx.seqpar is not None:
            from distsft.train.seqpar import GroupBatchSampler
            sampler = GroupBatchSampler(self.ctx.order, self.ctx.micro, self.ctx.accum, self.ctx.seqpar,
                                        self.ctx.total_steps, start_step=lambda: self.state.global_step)
            return _StepLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                               num_workers=0, pin_memory=self.args.device.type == "cuda")
        world, rank = (self.ctx.ring.dp_size, self.ctx.ring.dp_rank) if self.ctx.ring else (e.world_size, e.rank)
        sampler = StepBatchSampler(self.ctx.order, self.ctx.micro, self.ctx.accum, world, rank,
                                   self.ctx.total_steps, start_step=lambda: self.state.global_step)
        return _StepLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                           num_workers=0, pin_memory=self.args.device.type == "cuda")

    # ------------------------------------------------------------------ resume
    def train(self, resume_from_checkpoint: Any = None, **kwargs: Any) -> Any:
        self._rng_from = resume_from_checkpoint
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """MoE checkpoints are saved in the per-expert layout HF's resume cannot load (train.moe)."""
        from distsft.train.moe import reload_checkpoint_weights
        target = self.model if model is None else model
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not reload_checkpoint_weights(target, resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        """checkpoint.load_best_at_end: the same layout problem as resuming."""
        from distsft.train.moe import reload_checkpoint_weights
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not reload_checkpoint_weights(
                self.model, self.state.best_model_checkpoint):
            super()._load_best_model()

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """On the first step after a resume, the random state of the step the checkpoint was saved at
        (HF saves it per rank): with ignore_data_skip (distsft's sampler places itself by step) HF
        would not restore it, and NEFTune's noise and LoRA dropout would differ from the uninterrupted
        run's."""
        if getattr(self, "_rng_from", None):
            self._load_rng_state(self._rng_from)
            self._rng_from = None
        return super().training_step(*args, **kwargs)

    # ------------------------------------------------------------------ loss bookkeeping
    def get_batch_samples(self, epoch_iterator: Any, num_batches: int, device: Any) -> tuple[list[Any], Any]:
        batches, n = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.ctx.seqpar is not None and batches:  # HF counts nothing under Ulysses: the step's tokens
            from distsft.train.seqpar import step_loss_tokens
            n = step_loss_tokens(batches, self.args.device)
        return batches, n

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        # The collator's host counts (recipe.build_trainer): read here without touching the device.
        counts = {k: inputs.pop(k, 0) for k in ("num_real_tokens", "batch_checksum", "num_rows", "num_loss_tokens")}
        if self.ctx.seqpar is not None and model.training:
            return self._seqpar_loss(model, inputs, num_items_in_batch, counts)
        micro = None
        if model.training and self.ctx.losses is not None and not return_outputs:
            # distsft's loss (train.losses): TRL's per token, plus what TRL does not give back -- the LM
            # loss apart from the router term, per-source sums, the router loss over real tokens.
            micro = self.ctx.losses(self, model, inputs, num_items_in_batch)
            out = micro.loss
        else:
            for key in PER_TOKEN_KEYS:
                inputs.pop(key, None)
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        if model.training and num_items_in_batch is not None:
            loss = out[0] if return_outputs else out
            # TRL returns sum(token losses) / global tokens × world; undo the scaling to get this
            # micro-batch's own sum of token losses -- on the device, read once per logging step.
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            # The LM loss alone (train.losses keeps the router term out of it) when distsft computed it.
            loss_sum = micro.nll_sum if micro is not None else loss.detach() * num_items_in_batch / scale
            self.ctx.window.add(self.state.global_step, loss_sum,
                                counts["num_loss_tokens"], counts["num_real_tokens"], counts["num_rows"],
                                counts["batch_checksum"])
        return out

    def _seqpar_loss(self, model: Any, inputs: dict[str, Any], step_tokens: Any, counts: dict[str, Any]) -> Any:
        """One shard of a group's micro-batch (train.seqpar): the loss is token-weighted over the whole
        global batch; the window counts each shard's tokens on its rank, and the row, its real tokens
        and its checksum once per group (every rank of the group holds the same rows)."""
        from distsft.train.seqpar import train_loss
        rows = inputs["input_ids"].shape[0]
        loss, local_sum, n_local = train_loss(model, inputs, step_tokens, self.ctx.seqpar)
        once = 1 if self.ctx.seqpar.sp_rank == 0 else 0
        self.ctx.window.add(self.state.global_step, torch.tensor(local_sum), n_local,
                            once * int(counts["num_real_tokens"] or 0), once * rows, once * int(counts["batch_checksum"] or 0))
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            # One collective and one read: the window over all ranks, the peak memory and the preemption flag.
            start = self.ctx.window.start_step
            steps = max(1, self.state.global_step - (start if start is not None else self.state.global_step))
            extra = self.ctx.losses.window_sums() if self.ctx.losses is not None else None
            window, preempt = self.ctx.window.reduce(self.state.global_step, self.ctx.flag.raised,
                                                     _peak_memory_gb(self.args.device), extra=extra)
            logs.update(window)
            if extra is not None:  # aux_loss, entropy, accuracy, loss_<label> (train.losses)
                logs.update(self.ctx.losses.metrics(self.ctx.window.extra_total, window["loss_tokens"] * steps,
                                                    steps))
            if self.ctx.mfu is not None and logs.get("tokens_per_second"):
                logs["mfu"] = self.ctx.mfu(logs["tokens_per_second"])
            if preempt:
                stop_for_preemption(self.ctx, self.control)
        # HF counts epochs over the one long "epoch" the step sampler presents; report real epochs.
        self.state.epoch = self.ctx.order.epoch_of(self.state.global_step)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, eval_dataset: Any = None, ignore_keys: Any = None,
                 metric_key_prefix: str = "eval") -> dict[str, float]:
        """Token-weighted mean loss over the whole eval set, whatever the batch size, packing or process
        count: every rank sums token losses over its rows, then one all-reduce. With several eval sets
        ({label: rows}), `eval_loss` is token-weighted over all of them together and `eval_<label>_loss`
        is each set's own."""
        ds = self.eval_dataset if eval_dataset is None else eval_dataset
        if ds is None:
            return {}
        sets = ds if isinstance(ds, dict) else {None: ds}
        model = self.model
        was_training = model.training
        model.eval()
        with self.ctx.window.paused():  # not training time: out of tokens_per_second / step_time / mfu
            sums = {label: self._eval_loss_sums(part) for label, part in sets.items()}
        metrics = eval_metrics(sums, metric_key_prefix)
        self.log(metrics)  # still in eval mode, so TRL files it as an eval record
        model.train(was_training)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _eval_loss_sums(self, ds: Any) -> tuple[float, float]:
        """(sum of token losses, loss tokens) over one eval set, reduced over all ranks. The forward is
        training's (eval_loss.token_loss_sum), under the same autocast: fp32 master weights must reach
        flash-attn in bf16, and the head's output multiplier and soft cap must be training's."""
        e = dist.env()
        total = torch.zeros((), dtype=torch.float64, device=self.args.device)
        count = 0.0
        if self.ctx.seqpar is not None:
            from distsft.train.seqpar import eval_batches
            with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
                for batch, labels in eval_batches(ds, self.data_collator, self.ctx.micro, self.ctx.seqpar):
                    token_loss, n_tokens = token_loss_sum(self.model, self._prepare_inputs(batch), labels, shifted=True)
                    total, count = total + token_loss.to(torch.float64), count + n_tokens
            return tuple(dist.all_reduce([float(total), count], "sum", device=self.args.device))
        shards = eval_shards(len(ds), self.ctx.eval_batch, e.world_size, e.rank)
        with torch.no_grad(), self.compute_loss_context_manager(), self.accelerator.autocast():
            for rows in shards:
                # A rank with no rows left still runs a forward on one row (weight 0), so that ZeRO-3's
                # and FSDP2's collective parameter gathers line up across ranks.
                batch = self.data_collator([ds[i] for i in (rows or [0])])
                for key in ("num_real_tokens", "batch_checksum", "num_rows", "num_loss_tokens", *PER_TOKEN_KEYS):
                    batch.pop(key, None)
                labels = batch.pop("labels")
                token_loss, n_tokens = token_loss_sum(self.model, self._prepare_inputs(batch), labels)
                if rows:
                    total += token_loss.to(torch.float64)
                    count += n_tokens
        total, count = dist.all_reduce([float(total), count], "sum", device=self.args.device)
        return total, count

    # ------------------------------------------------------------------ checkpoints
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Intermediate ZeRO-3 saves keep DeepSpeed's partitioned state only (saves.py); the final save,
        and every other backend's, is HF's."""
        if saves.sharded_only(self, _internal_call):
            saves.save_metadata(self, output_dir or self.args.output_dir)
            return
        super().save_model(output_dir, _internal_call=_internal_call)

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        started = time.perf_counter()
        path = rundir.checkpoint_dir(self.args.output_dir, self.state.global_step)
        # An incomplete checkpoint-N from an earlier attempt (killed mid-save, maybe at another world size)
        # must not lend its stale shards to this one: rank 0 removes it before any rank writes.
        if self.is_world_process_zero():
            checkpoint.clear_incomplete(path)
        dist.barrier()
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as exc:
            if not checkpoint.is_disk_full(exc, self.args.output_dir):
                raise
            shutil.rmtree(path, ignore_errors=True)  # never loaded (no marker); give the space back
            last = checkpoint.latest_complete(self.args.output_dir)
            raise checkpoint.DiskFullError(
                f"no space left while writing {path}: {str(exc).splitlines()[0]}. The newest complete "
                f"checkpoint, {last.name if last else '(none yet)'}, is intact; free space and rerun the "
                "same command to resume") from None
        # Every rank has written its shards (ZeRO) / RNG state; only now does the checkpoint count.
        dist.barrier()
        if self.is_world_process_zero():
            checkpoint.write_marker(path, dataclasses.replace(
                self.ctx.marker, step=self.state.global_step, world_size=dist.env().world_size, time=time.time(),
                rows_consumed=self.state.global_step * self.ctx.order.global_batch))
            best = self.state.best_model_checkpoint
            checkpoint.rotate(self.args.output_dir, self.ctx.save_total_limit,
                              protect={Path(best)} if best else None)
        dist.barrier()
        self._record_save(time.perf_counter() - started)

    def _record_save(self, seconds: float) -> None:
        """save_seconds in metrics.jsonl, and the one-time signal_delay_s warning (saves.SaveClock)."""
        self.ctx.window.excluded += seconds  # not training time: out of tokens_per_second / step_time / mfu
        if self.ctx.save_clock is not None:
            step_time = next((h["step_time"] for h in reversed(self.ctx.history) if h.get("step_time")), None)
            self.ctx.save_clock.record(seconds, self.state.global_step, step_time, self.ctx.writer, self.args.device)


def eval_metrics(sums: dict[Any, tuple[float, float]], prefix: str = "eval") -> dict[str, float]:
    """`<prefix>_loss` token-weighted over all sets together; `<prefix>_<label>_loss` per set when there
    are several (sums: label -> (sum of token losses, tokens))."""
    total = sum(t for t, _ in sums.values())
    count = sum(c for _, c in sums.values())
    out = {f"{prefix}_loss": total / count if count else float("nan"), f"{prefix}_tokens": count}
    if len(sums) > 1:
        for label, (t, c) in sums.items():
            out[f"{prefix}_{label}_loss"] = t / c if c else float("nan")
    return out


def stop_for_preemption(ctx: RunContext, control: Any) -> None:
    """Every rank saves at this step boundary and stops (the ranks agreed on the flag)."""
    ctx.preempted = True
    control.should_save = True
    control.should_training_stop = True


class PreemptionCallback(TrainerCallback):
    """Ranks agree on a preemption signal without a blocking collective of their own (step_sync); then all
    of them save at the same step boundary and stop. It also drops a torch.compile warm-up step from the
    throughput figures."""

    def __init__(self, ctx: RunContext, device: torch.device):
        self.ctx, self.device = ctx, device
        self.agreement = PreemptionAgreement(ctx.flag)
        self._first_step = True

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self._first_step and self.ctx.compiled and self.ctx.window is not None:
            self.ctx.window.restart_timing(state.global_step)
        self._first_step = False
        # DefaultFlowCallback ran first: should_log says whether the window's reduction follows.
        if self.agreement.step_end(logging_now=bool(control.should_log)):
            stop_for_preemption(self.ctx, control)
        return control

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.agreement.finish()


DROPPED_KEYS = {"total_flos", "num_tokens"}


class SinkCallback(TrainerCallback):
    """Rank 0 forwards each (already reduced) log record to the sinks and the console."""

    def __init__(self, ctx: RunContext, progress: Any):
        self.ctx, self.progress = ctx, progress

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> None:
        if not logs or self.ctx.writer is None:
            return
        # TRL's cumulative num_tokens counts padding too; distsft's `tokens` is the real-token count.
        record = {"step": state.global_step, **{k: v for k, v in logs.items() if k not in DROPPED_KEYS}}
        if "eval_loss" in record:
            train = next((h["loss"] for h in reversed(self.ctx.history) if "loss" in h), None)
            if train is not None:
                record["train_eval_gap"] = record["eval_loss"] - train
        self.ctx.history.append(record)
        self.ctx.writer.write(record)
        self.progress.update(record)
