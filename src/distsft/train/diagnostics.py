"""Training health checks on the logged metrics: stop on a NaN/inf loss without saving, warn about a
loss that does not fall, memorisation and overfitting, and optionally stop early on eval loss.

The values a callback sees in `on_log` are already reduced across ranks (trainer.DistSFTTrainer.log),
and `state.log_history` holds the same records on every rank, restored from the checkpoint on resume.
So every rank takes the same decision at the same step (a rank that stopped alone would hang the
others in their next collective), and patience survives a requeue.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from distsft.runtime import dist

WINDOW = 3  # logged losses averaged on each side of the "is it falling" comparison
MIN_DROP = 0.01  # the loss must fall by more than 1% from the end of warmup
MIN_STEPS = 10  # optimizer steps after warmup before the "is it falling" check may speak
MEMORISED_LOSS = 0.1


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


class Diagnostics(TrainerCallback):
    """`failed` is set (a message) when training was stopped on a non-finite loss: the job exits 1.
    `records` collects `{"step", "warning"}` dicts; they also go to `writer` (rank 0) when given."""

    def __init__(self, spec: Any, total_steps: int, warmup_steps: int, steps_per_epoch: int | None = None,
                 writer: Any = None):
        self.spec, self.total, self.warmup = spec, total_steps, warmup_steps
        self.steps_per_epoch, self.writer = steps_per_epoch, writer
        self.patience = spec.checkpoint.early_stopping_patience
        self.failed: str | None = None
        self.stopped_early = False
        self.records: list[dict[str, Any]] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ hooks
    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        # Log at every save step, even off the logging cadence, so a NaN that appeared since the last
        # log is seen (and the save cancelled) before a broken checkpoint is written. should_save is the
        # same on every rank, so the forced log's collective is too.
        if control.should_save:
            control.should_log = True
        return self._keep_stopped(control)

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._keep_stopped(control)

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        return self._keep_stopped(control)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None,
               **kwargs: Any) -> Any:
        if not logs or self.failed:
            return self._keep_stopped(control)
        step = state.global_step
        if "loss" in logs:
            bad = self._non_finite(logs)
            if bad:
                self._fail(step, bad, control)
                return control
            self._check_falling(step, state.log_history)
            self._check_memorising(step, logs)
        if _finite(logs.get("eval_loss")):
            evals = [(h["step"], h["eval_loss"]) for h in state.log_history if _finite(h.get("eval_loss"))]
            self._check_overfitting(evals, state.log_history)
            self._check_patience(step, evals, control)
        return control

    # ------------------------------------------------------------------ NaN / inf
    def _keep_stopped(self, control: Any) -> Any:
        if self.failed:
            control.should_training_stop = True
            control.should_save = False  # never checkpoint the NaN state: the last complete one is kept
            control.should_evaluate = False
        return control

    def _non_finite(self, logs: dict[str, Any]) -> str | None:
        keys = ["loss"]
        # Under fp16 the loss scaler skips a step whose gradients overflowed and lowers the scale: an
        # inf grad_norm there is routine. Elsewhere it means the update itself is broken.
        if not self.spec.train.fp16:
            keys.append("grad_norm")
        bad = [f"{k} is {logs[k]}" for k in keys if isinstance(logs.get(k), (int, float)) and not _finite(logs[k])]
        return ", ".join(bad) or None

    def _fail(self, step: int, what: str, control: Any) -> None:
        t = self.spec.train
        fp16 = ("you train with train.fp16=true; switch to bf16 where the GPU supports it (train.bf16=true "
                "train.fp16=false)" if t.fp16 else "not here (train.fp16 is false), but with fp16 use bf16 instead")
        self.failed = f"step {step}: {what}"
        dist.print0(
            f"\nerror: training stopped at step {step}: {what}. Nothing from this state was saved (earlier "
            "complete checkpoints are kept).\nUsual causes, most common first:\n"
            f"  - fp16 overflow: {fp16}\n"
            f"  - learning rate too high: train.learning_rate={t.learning_rate:g}; try 3-10x lower\n"
            f"  - too little warmup: {self.warmup} warmup steps (train.warmup_ratio={t.warmup_ratio}); "
            "try 0.03-0.1\n"
            "  - bad data: empty or extremely long examples; `distsft plan` shows the length histogram\n"
            "Change the spec, then rerun: checkpoint.resume=auto continues from the last complete checkpoint "
            "(checkpoint.resume=never starts over).")
        self._keep_stopped(control)

    # ------------------------------------------------------------------ warnings
    def _warn(self, kind: str, step: int, msg: str) -> None:
        if kind in self._warned:
            return
        self._warned.add(kind)
        dist.print0(f"warning: step {step}: {msg}")
        rec = {"step": step, "warning": msg}
        self.records.append(rec)
        if self.writer is not None:
            self.writer.write(rec)

    def _check_falling(self, step: int, history: list[dict[str, Any]]) -> None:
        """Once warmup is over and enough steps exist to tell (at least MIN_STEPS after warmup, and
        max(2 × warmup, 20% of training)), the recent loss must be below the end-of-warmup loss by more
        than 1% (means over WINDOW logged values each, so one noisy log does not decide). Before, a
        short run was told "loss is not falling" at step 2, comparing one log with another."""
        if step < max(self.warmup + MIN_STEPS, 2 * self.warmup, math.ceil(0.2 * self.total)):
            return
        losses = [(h["step"], h["loss"]) for h in history if _finite(h.get("loss"))]
        base = [x for x in losses if x[0] <= self.warmup][-WINDOW:] or losses[:WINDOW]
        if not base:
            return
        recent = [x for x in losses if x[0] > base[-1][0]][-WINDOW:]
        if len(recent) < WINDOW:
            return
        b, r = _mean([x[1] for x in base]), _mean([x[1] for x in recent])
        if r > b * (1 - MIN_DROP):
            lr = self.spec.train.learning_rate
            self._warn("not_falling", step,
                       f"loss is not falling: {r:.4f} (mean of the last {len(recent)} logs) vs {b:.4f} at the end "
                       f"of warmup (step {base[-1][0]}). Check train.learning_rate={lr:g} (too low, or too high "
                       "if grad_norm is large), and that the loss covers the assistant turns (loss_tokens).")

    def _check_memorising(self, step: int, logs: dict[str, Any]) -> None:
        epoch = step / self.steps_per_epoch if self.steps_per_epoch else logs.get("epoch")
        if _finite(logs["loss"]) and logs["loss"] < MEMORISED_LOSS and _finite(epoch) and epoch < 1:
            self._warn("memorising", step,
                       f"loss {logs['loss']:.4f} < {MEMORISED_LOSS} within the first epoch (epoch {epoch:.2f}): the "
                       "model is memorising. Look for duplicated or templated examples; use fewer epochs, a lower "
                       "learning rate or more data, and watch the eval loss.")

    def _check_overfitting(self, evals: list[tuple[int, float]], history: list[dict[str, Any]]) -> None:
        if len(evals) < 3 or not evals[-3][1] < evals[-2][1] < evals[-1][1]:
            return

        def train_loss_at(step: int) -> float | None:
            return next((h["loss"] for h in reversed(history) if h["step"] <= step and _finite(h.get("loss"))), None)

        before, now = train_loss_at(evals[-3][0]), train_loss_at(evals[-1][0])
        if before is not None and now is not None and now < before:
            hint = ("" if self.patience else " Set checkpoint.early_stopping_patience (with "
                    "checkpoint.load_best_at_end) to stop and keep the best checkpoint.")
            self._warn("overfitting", evals[-1][0],
                       "eval loss rose for 2 consecutive evaluations (" + " → ".join(f"{e:.4f}" for _, e in evals[-3:])
                       + f") while train loss fell ({before:.4f} → {now:.4f}): overfitting. Fewer epochs, a lower "
                       "learning rate or more data usually help." + hint)

    def _check_patience(self, step: int, evals: list[tuple[int, float]], control: Any) -> None:
        """Stop when the last `patience` evaluations did not beat the best before them. The history
        comes from state.log_history, so evaluations before a resume count too."""
        if not self.patience:
            return
        best = min(range(len(evals)), key=lambda i: evals[i][1])
        if len(evals) - 1 - best < self.patience:
            return
        control.should_training_stop = True
        self.stopped_early = True
        reload = (" The best checkpoint is reloaded at the end (checkpoint.load_best_at_end)."
                  if self.spec.checkpoint.load_best_at_end else "")
        self._warn("early_stop", step,
                   f"early stopping: eval loss has not improved for {self.patience} evaluation(s) since step "
                   f"{evals[best][0]} (best {evals[best][1]:.4f}).{reload}")
