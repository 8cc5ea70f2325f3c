"""distsft's own host syncs: at most one per optimizer step (benchmarks/host_syncs.py counts them).

On a GPU every read of a tensor's value on the host (.item(), .tolist(), float(t)) waits for the device,
and every blocking collective waits for the other ranks. distsft used to do three per micro-batch (the
loss and the label count of each one, read to keep the logging window) plus three collectives per step
(the preemption agreement, and the window's sums and peak memory). Now:

* `StepWindow` keeps the window where its numbers are made: the loss sum on the device, the counts as
  host integers from the collator. At a logging step they, the peak memory and the preemption flag
  travel in one all_gather, read once.
* `PreemptionAgreement`: at a step that logs, the flag rides on that gather; at other steps an
  all-reduce of a host tensor (gloo, which the early process group carries next to NCCL) is started
  without waiting and read at the next step end, when it is long done. A preemption is acted on at
  most one step late, and every rank decides from the same value.

The throughput clock excludes what is not training: eval, checkpoint saves and sample generation run
inside `paused()`, and a torch.compile warm-up step is dropped (`restart_timing`), so tokens_per_second,
step_time and mfu describe training steps only.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch

from distsft.runtime import dist

# The gathered vector: sums over ranks, then maxima over ranks.
SUMS = ("loss_sum", "loss_tokens", "real_tokens", "rows", "checksum", "timed_tokens")
MAXES = ("preempt", "peak_memory_gb")


class StepWindow:
    def __init__(self, device: Any, clock: Callable[[], float] = time.perf_counter):
        self.device, self.clock = device, clock
        self.start_step: int | None = None  # set at the window's first micro-batch
        self._reset(None)

    def _reset(self, step: int | None) -> None:
        self.loss: torch.Tensor | None = None
        self.counts = {k: 0.0 for k in SUMS if k != "loss_sum"}
        self.start_step = self.timed_step = step
        self.start_time = self.timed_start = self.clock()
        self.excluded = 0.0

    def add(self, step: int, loss_sum: torch.Tensor, loss_tokens: int, real_tokens: int, rows: int,
            checksum: int) -> None:
        """One micro-batch: its summed token loss (a device tensor, never read here) and host counts."""
        if self.start_step is None:
            self._reset(step)
        loss_sum = loss_sum.detach().to(torch.float64)
        self.loss = loss_sum if self.loss is None else self.loss + loss_sum
        for key, value in (("loss_tokens", loss_tokens), ("real_tokens", real_tokens), ("rows", rows),
                           ("checksum", checksum), ("timed_tokens", real_tokens)):
            self.counts[key] += float(value)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (eval, saves, generation)."""
        t0 = self.clock()
        try:
            yield
        finally:
            self.excluded += self.clock() - t0

    def restart_timing(self, step: int) -> None:
        """Drop the steps so far from the throughput figures (their loss still counts): a warm-up step's
        compilation is not training speed."""
        self.timed_step, self.timed_start, self.excluded = step, self.clock(), 0.0
        self.counts["timed_tokens"] = 0.0

    def reduce(self, step: int, preempt: bool, peak_memory_gb: float,
               extra: torch.Tensor | None = None) -> tuple[dict[str, float], bool]:
        """The window's metrics over all ranks, and whether any rank has a preemption flag raised.
        `extra`: more per-rank sums (a device vector, train.losses') carried by the same collective;
        their totals over the ranks are left in `self.extra_total`."""
        local = [self.counts.get(k, 0.0) for k in SUMS] + [1.0 if preempt else 0.0, peak_memory_gb]
        vec = torch.tensor(local, dtype=torch.float64, device=self.device)
        if self.loss is not None:
            vec[0] = self.loss.to(vec.device)  # a device-side copy, no read
        n = vec.numel()
        if extra is not None:
            vec = torch.cat([vec, extra.detach().to(device=vec.device, dtype=torch.float64)])
        rows = gather_rows(vec)  # the one read of this logging step
        total = {k: sum(r[i] for r in rows) for i, k in enumerate(SUMS)}
        top = {k: max(r[len(SUMS) + i] for r in rows) for i, k in enumerate(MAXES)}
        self.extra_total = [sum(r[i] for r in rows) for i in range(n, len(rows[0]))]
        now = self.clock()
        steps = max(1, step - (self.start_step if self.start_step is not None else step))
        timed_steps = step - (self.timed_step if self.timed_step is not None else step)
        timed = now - self.timed_start - self.excluded
        tokens = total["loss_tokens"]
        out = {"loss": total["loss_sum"] / tokens if tokens else float("nan"),
               "tokens": total["real_tokens"] / steps, "loss_tokens": tokens / steps,
               "samples": total["rows"] / steps, "peak_memory_gb": top["peak_memory_gb"],
               "batch_checksum": total["checksum"]}
        if timed_steps > 0 and timed > 0:
            out.update(tokens_per_second=total["timed_tokens"] / timed, step_time=timed / timed_steps)
        self._reset(step)
        return out, top["preempt"] > 0


def gather_rows(vec: torch.Tensor) -> list[list[float]]:
    """Every rank's `vec`, in one collective and one read."""
    e = dist.env()
    if e.world_size <= 1 or not dist.initialized():
        return [vec.tolist()]
    import torch.distributed as tdist
    out = torch.empty(e.world_size * vec.numel(), dtype=vec.dtype, device=vec.device)
    tdist.all_gather_into_tensor(out, vec)
    flat = out.tolist()
    n = vec.numel()
    return [flat[i * n:(i + 1) * n] for i in range(e.world_size)]


class PreemptionAgreement:
    """Whether every rank should save and stop now, without a blocking collective of its own."""

    def __init__(self, flag: Any):
        self.flag = flag
        self._pending: tuple[Any, torch.Tensor] | None = None

    def step_end(self, logging_now: bool) -> bool:
        """At each optimizer step's end. True: the ranks agreed (here, one step late at most). At a
        logging step it returns False and the window's reduction decides, carrying the current flag."""
        agreed = False
        if self._pending is not None:
            work, value = self._pending
            self._pending = None
            work.wait()  # started a step ago: done by now
            if not logging_now:
                agreed = value.item() > 0  # a host tensor: no device sync
        if logging_now:
            return agreed
        if not dist.initialized() or dist.env().world_size <= 1:
            return agreed or bool(self.flag.raised)
        import torch.distributed as tdist
        value = torch.tensor([1.0 if self.flag.raised else 0.0])  # on the host: gloo, not the GPU stream
        self._pending = (tdist.all_reduce(value, op=tdist.ReduceOp.MAX, async_op=True), value)
        return agreed

    def finish(self) -> None:
        """Complete an agreement still in flight (every rank started it)."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
