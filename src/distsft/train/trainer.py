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
        if ctx.losses is not None and ctx.losses.moe is not None:
            # TRL's init set the config's coefficient to the 0.0 distsft passes it (arguments.loss_args);
            # the saved config keeps the model's own.
            self.model.config.get_text_config().router_aux_loss_coef = ctx.losses.moe.router_aux_loss_coef
        # loss sum, loss tokens, real tokens, rows, batch checksum (which samples a step saw)
        self._window = torch.zeros(5, dtype=torch.float64)
        self._window_start = time.perf_counter()
        self._window_step: int | None = None  # set at the first micro-batch: the step we (re)started from

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
        real_tokens = inputs.pop("num_real_tokens", None)
        checksum = inputs.pop("batch_checksum", 0.0)
        if self.ctx.seqpar is not None and model.training:
            return self._seqpar_loss(model, inputs, num_items_in_batch, real_tokens, checksum)
        if model.training and self.ctx.losses is not None and not return_outputs:
            # distsft's loss (train.losses): TRL's per token, plus what TRL does not give back -- the LM
            # loss apart from the router term, per-source sums, the router loss over real tokens.
            micro = self.ctx.losses(self, model, inputs, num_items_in_batch)
            out, local_sum, n_local = micro.loss, micro.nll_sum, micro.tokens
        else:
            for key in PER_TOKEN_KEYS:
                inputs.pop(key, None)
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            loss = out[0] if return_outputs else out
            n_local = int((inputs["labels"][..., 1:] != -100).sum())
            # TRL returns sum(token losses) / global tokens × world; undo the scaling to get this
            # micro-batch's own sum of token losses.
            scale = self.accelerator.num_processes if self.args.average_tokens_across_devices else 1
            local_sum = float(loss.detach()) * float(num_items_in_batch or 0) / scale
        if model.training and num_items_in_batch is not None:
            if self._window_step is None:
                self._window_start, self._window_step = time.perf_counter(), self.state.global_step
            self._window += torch.tensor([local_sum, n_local, float(real_tokens or 0),
                                          inputs["input_ids"].shape[0], float(checksum)], dtype=torch.float64)
        return out

    def _seqpar_loss(self, model: Any, inputs: dict[str, Any], step_tokens: Any, real_tokens: Any,
                     checksum: Any) -> Any:
        """One shard of a group's micro-batch (train.seqpar): the loss is token-weighted over the whole
        global batch; the window counts each shard's tokens on its rank, and the row, its real tokens
        and its checksum once per group (every rank of the group holds the same rows)."""
        from distsft.train.seqpar import train_loss
        if self._window_step is None:
            self._window_start, self._window_step = time.perf_counter(), self.state.global_step
        rows = inputs["input_ids"].shape[0]
        loss, local_sum, n_local = train_loss(model, inputs, step_tokens, self.ctx.seqpar)
        once = 1.0 if self.ctx.seqpar.sp_rank == 0 else 0.0
        self._window += torch.tensor([local_sum, n_local, once * float(real_tokens or 0), once * rows,
                                      once * float(checksum)], dtype=torch.float64)
        return loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            logs.update(self._reduce_window())
            if self.ctx.mfu is not None and logs.get("tokens_per_second"):
                logs["mfu"] = self.ctx.mfu(logs["tokens_per_second"])
        # HF counts epochs over the one long "epoch" the step sampler presents; report real epochs.
        self.state.epoch = self.ctx.order.epoch_of(self.state.global_step)
        super().log(logs, start_time)

    def _reduce_window(self) -> dict[str, float]:
        """Two small collectives per logging step: the global token-weighted loss and throughput
        figures (sums) and the peak memory (max)."""
        device = self.args.device
        sums = dist.all_reduce(self._window.tolist(), "sum", device=device)
        peak = dist.all_reduce([_peak_memory_gb(device)], "max", device=device)[0]
        now = time.perf_counter()
        steps = max(1, self.state.global_step - (self._window_step or 0))
        elapsed = now - self._window_start
        self._window.zero_()
        self._window_start, self._window_step = now, self.state.global_step
        loss_sum, loss_tokens, real_tokens, rows, checksum = sums
        extra = self.ctx.losses.reduce(dist.all_reduce, device, loss_tokens, steps) if self.ctx.losses else {}
        return {"loss": loss_sum / loss_tokens if loss_tokens else float("nan"),
                "tokens": real_tokens / steps, "loss_tokens": loss_tokens / steps,
                "tokens_per_second": real_tokens / elapsed if elapsed > 0 else 0.0,
                "samples": rows / steps, "step_time": elapsed / steps, "peak_memory_gb": peak,
                "batch_checksum": checksum, **extra}

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
        sums = {label: self._eval_loss_sums(part) for label, part in sets.items()}
        metrics = eval_metrics(sums, metric_key_prefix)
        self.log(metrics)  # still in eval mode, so TRL files it as an eval record
        model.train(was_training)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    def _eval_loss_sums(self, ds: Any) -> tuple[float, float]:
        """(sum of token losses, loss tokens) over one eval set, reduced over all ranks."""
        e = dist.env()
        model = self.model
        total, count = 0.0, 0.0
        if self.ctx.seqpar is not None:
            from distsft.train.seqpar import eval_batches
            with torch.no_grad(), self.compute_loss_context_manager():
                for batch, labels in eval_batches(ds, self.data_collator, self.ctx.micro, self.ctx.seqpar):
                    token_loss, n_tokens = token_loss_sum(model, self._prepare_inputs(batch), labels, shifted=True)
                    total, count = total + float(token_loss), count + float(n_tokens)
            return tuple(dist.all_reduce([total, count], "sum", device=self.args.device))
        shards = eval_shards(len(ds), self.ctx.eval_batch, e.world_size, e.rank)
        with torch.no_grad(), self.compute_loss_context_manager():
            for rows in shards:
                # A rank with no rows left still runs a forward on one row (weight 0), so that ZeRO-3's
                # collective parameter gathers line up across ranks.
                batch = self.data_collator([ds[i] for i in (rows or [0])])
                for key in ("num_real_tokens", "batch_checksum", *PER_TOKEN_KEYS):
                    batch.pop(key, None)
                labels = batch.pop("labels")
                batch = self._prepare_inputs(batch)
                # Never the batch's full fp32 logits: the head runs on labelled positions, in chunks.
                token_loss, n_tokens = token_loss_sum(model, batch, labels)
                if rows:
                    total += float(token_loss)
                    count += float(n_tokens)
        total, count = dist.all_reduce([total, count], "sum", device=self.args.device)
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


class PreemptionCallback(TrainerCallback):
    """Ranks agree on a preemption signal with one tiny all-reduce per optimizer step; then all of them
    save at the same step boundary and stop."""

    def __init__(self, ctx: RunContext, device: torch.device):
        self.ctx, self.device = ctx, device

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if dist.all_reduce([1.0 if self.ctx.flag.raised else 0.0], "max", device=self.device)[0]:
            self.ctx.preempted = True
            control.should_save = True
            control.should_training_stop = True
        return control


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
