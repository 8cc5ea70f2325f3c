"""`per_device_train_batch_size: auto` on a GPU: one forward/backward on the longest packed row confirms
the micro-batch the memory estimate chose (plan.fit), halving on out-of-memory, before training starts.

The estimate leaves out the CUDA context, allocator fragmentation and kernels' workspaces; the probe
measures the real thing once. Halving keeps the global batch exact: the next micro-batch is the largest
candidate (a divisor of global batch / data-parallel GPUs) at most half the one that failed, so
gradient accumulation is re-derived as an integer. Every rank probes and all take the smallest result
(ranks may hold different shards), and rank 0 records it in auto_batch.json (plan.fit), which the
launcher pins into run.yaml on a resume and the ranks prefer to run.yaml's estimate on a requeue.

On CPU there is nothing to probe (host memory pages out rather than failing): the estimate stands.
HF's `auto_find_batch_size` is not used: it changes the global batch and is refused under DeepSpeed and
FSDP (transformers #29058).
"""

from __future__ import annotations

from typing import Any, Callable

from distsft.errors import SpecError

# Bytes per trainable parameter that one forward/backward on the bare model does not allocate but the
# first optimizer step does: AdamW's two fp32 states (8; 2 for 8-bit optimizers), and DDP's gradient
# buckets (a second copy of the fp32 gradients, 4).
OPTIMIZER_BYTES = {"8bit": 2, "default": 8}
DDP_BUCKET_BYTES = 4


class OverBudget(Exception):
    """The probe step ran, but its peak plus what the optimizer step will add exceeds the usable GPU
    memory: as good as out of memory one step later."""


def is_oom(exc: BaseException) -> bool:
    """CUDA's out-of-memory, as torch raises it (and as some kernels re-raise it as RuntimeError)."""
    import torch
    return (isinstance(exc, (torch.OutOfMemoryError, OverBudget))
            or "out of memory" in str(exc).lower())


def probe(step: Callable[[int], None], micro: int, candidates: list[int],
          on_oom: Callable[[], None] | None = None, oom: Callable[[BaseException], bool] = is_oom) -> int:
    """The largest micro-batch from `micro` down through `candidates` for which `step(micro)` (one
    forward/backward) runs; each out-of-memory halves it. SpecError when even the smallest fails."""
    tried = []
    while True:
        try:
            step(micro)
            return micro
        except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raises
            if not oom(exc):
                raise
            tried.append(micro)
            if on_oom is not None:
                on_oom()
            smaller = [m for m in candidates if m <= micro // 2]
            if not smaller:
                raise SpecError(f"train.per_device_train_batch_size: auto: out of GPU memory even at a micro-batch "
                                f"of {micro} (tried {', '.join(map(str, tried))}); use gradient checkpointing, "
                                "ZeRO-3/FSDP2, LoRA/QLoRA or a shorter data.max_length") from None
            micro = max(smaller)


def longest_row(dataset: Any) -> dict[str, Any]:
    """The packed row with the most real tokens (the costliest one training will see)."""
    best, best_len = None, -1
    for i in range(len(dataset)):
        row = dataset[i]
        n = len(row["input_ids"])
        if n > best_len:
            best, best_len = row, n
    if best is None:
        raise SpecError("train.per_device_train_batch_size: auto: the training data has no rows to probe with")
    return best


def forward_backward(model: Any, collate: Callable[[list[dict[str, Any]]], dict[str, Any]], row: dict[str, Any],
                     device: Any, precision: str = "bf16") -> Callable[[int], None]:
    """A step function for `probe`: `micro` copies of `row`, one forward and backward under the run's
    autocast (none in fp32), then the gradients and cached blocks are released so training starts from
    a clean allocator."""
    import contextlib

    import torch
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step(micro: int) -> None:
        batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in collate([row] * micro).items()}
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "labels", "position_ids", "attention_mask")}
        try:
            cast = (torch.autocast(device_type=getattr(device, "type", str(device)), dtype=dtype) if dtype
                    else contextlib.nullcontext())
            with cast:
                out = model(**batch)
            out.loss.backward()
        finally:
            model.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return step


def release() -> None:
    import gc

    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def not_probed(spec: Any, cuda: bool, sequence_parallel_size: int) -> str | None:
    """Why the probe does not run for this `auto` spec on this rank (None: it runs)."""
    if not cuda:
        return "no GPU to probe; host memory pages out instead of failing: the estimate stands"
    if spec.distributed.backend != "ddp" or sequence_parallel_size > 1:
        # The bare model before the trainer wraps it is whole on every GPU; under ZeRO/FSDP2 or sequence
        # parallelism the training step is sharded, so the bare model's peak would not be the step's.
        return (f"the probe runs where every GPU holds the whole model (backend ddp); under "
                f"{spec.distributed.backend} the estimate (with its margin) stands")
    return None


def optimizer_extra_bytes(model: Any, optim: str) -> int:
    """What the first optimizer step and DDP add to a bare forward/backward's peak."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per = OPTIMIZER_BYTES["8bit" if "8bit" in optim else "default"] + DDP_BUCKET_BYTES
    return trainable * per


def within(step: Callable[[int], None], budget_bytes: float, extra_bytes: int,
           peaks: dict[int, float]) -> Callable[[int], None]:
    """`step` that measures its CUDA peak (kept in `peaks`, GiB) and raises OverBudget when the peak plus
    `extra_bytes` exceeds `budget_bytes`."""
    import torch

    def checked(micro: int) -> None:
        torch.cuda.reset_peak_memory_stats()
        step(micro)
        peak = torch.cuda.max_memory_allocated()
        peaks[micro] = peak / 2**30
        if peak + extra_bytes > budget_bytes:
            raise OverBudget(f"micro-batch {micro}: peak {peak / 2**30:.1f} GiB + optimizer "
                             f"{extra_bytes / 2**30:.1f} GiB over {budget_bytes / 2**30:.1f} GiB")
    return checked


def confirm(spec: Any, model: Any, dataset: Any, collate: Callable[[list[dict[str, Any]]], dict[str, Any]],
            device: Any, estimated: int, candidates: list[int], precision: str = "bf16",
            step_for: Callable[..., Callable[[int], None]] | None = None) -> tuple[int, str]:
    """(micro-batch, the line that says how it was settled) for this rank: the estimate's `estimated`
    confirmed on the longest row, or the largest candidate below it that runs. `step_for` builds the
    probe's step (forward_backward within the usable memory on a GPU; tests pass a stand-in that
    enforces the same contract: OverBudget or torch.OutOfMemoryError above a size)."""
    row = longest_row(dataset)
    if step_for is None:
        import torch
        from distsft.plan.fit import usable_gb
        total = torch.cuda.get_device_properties(device).total_memory
        budget = usable_gb(total / 2**30) * 2**30
        extra = optimizer_extra_bytes(model, spec.train.optim)
        peaks: dict[int, float] = {}
        step = within(forward_backward(model, collate, row, device, precision), budget, extra, peaks)
    else:
        step, peaks = step_for(model, collate, row, device), {}
    if getattr(getattr(model, "config", None), "use_cache", False):
        model.config.use_cache = False  # training never uses it; the probe must not allocate it
    micro = probe(step, estimated, [m for m in candidates if m <= estimated], on_oom=release)
    release()
    peak = f", peak {peaks[micro]:.1f} GiB before the optimizer's states" if micro in peaks else ""
    what = "confirmed" if micro == estimated else f"lowered from the estimate's {estimated}"
    return micro, (f"per_device_train_batch_size auto: {micro} {what} by one forward/backward on the longest "
                   f"row ({len(row['input_ids'])} tokens){peak}")


def settle(r: Any, packed_collator: Callable[[], Any]) -> None:
    """After the model (the probe runs it) and before the trainer (which takes the micro-batch):
    `per_device_train_batch_size: auto` on a GPU is confirmed by one forward/backward on the longest
    row, halved on out-of-memory (train.autobatch). Every rank probes, all take the smallest, rank 0
    records it (auto_batch.json: a resume or requeue uses the same) and the arguments are rebuilt with
    the re-derived accumulation: the global batch is what the user asked. `r` is train.recipe's Rank."""
    from distsft.plan import fit
    from distsft.runtime import dist
    spec, e = r.spec, dist.env()
    if not fit.auto_requested(spec, e.world_size):
        return
    estimated = r.batch.per_device_train_batch_size
    probed = fit.probed_micro(spec, e.world_size)
    why = not_probed(spec, r.cuda, r.batch.sequence_parallel_size)
    if probed is not None or why is not None:
        micro = probed or estimated
        dist.print0(f"per_device_train_batch_size auto: {micro} "
                    f"({'settled by the probe of an earlier attempt (auto_batch.json)' if probed else why})")
        _adopt_micro(r, micro)
        return
    if spec.train.gradient_checkpointing:  # as training will run it (the trainer enables it again)
        r.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    packed = packed_collator()
    micro, line = confirm(spec, r.model, r.train_ds, packed, r.device, estimated,
                                    fit.micro_candidates(r.batch.global_batch_size, r.batch.data_parallel_size),
                                    precision=r.precision)
    micro = int(dist.all_reduce([float(micro)], op="min", device=r.device)[0])  # the tightest rank decides
    if e.is_main:
        fit.record_auto(spec, e.world_size, micro, estimated, probed=True)
    dist.barrier()
    fit.forget_resolved()
    dist.print0(line + (f"; {micro} on every rank" if micro != estimated else ""))
    _adopt_micro(r, micro)


def _adopt_micro(r: Any, micro: int) -> None:
    """Train at `micro`: the batch arithmetic re-derived for the same global batch, the arguments rebuilt."""
    if micro == r.batch.per_device_train_batch_size:
        return
    from distsft.plan.batch import resolve_batch
    from distsft.train.arguments import sft_config
    b = r.batch
    r.batch = resolve_batch(micro, b.world_size, None, b.global_batch_size, b.sequence_parallel_size)
    r.args = sft_config(r)
