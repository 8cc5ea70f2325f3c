"""Where one optimizer step of distsft goes: a short 2-CPU-rank run of the real distsft job with timers
wrapped around the trainer's pieces (nothing in src/ changes; the wrapping happens in this script).

    python benchmarks/profile_step.py [--n 20000] [--steps 18] [--skip 3] [--logging-steps 5]

The driver renders the run dir and prepares the data cache the way `distsft run` does (distsft.render,
distsft.launcher.prepare), then starts the ranks with the rendered accelerate.yaml and the launcher's
environment, but with this file as the rank entry (`--rank RUN_YAML`). Each rank monkeypatches, then
calls distsft.train.recipe.run_rank(RUN_YAML) exactly as distsft.train does.

Timers are exclusive (a nested timed call is charged to the inner label only):
  data: sampler + Arrow rows  Trainer.get_batch_samples, minus what is listed below it
  data: collate               distsft's collate (PackedCollator + real-token count + row checksums)
  HF num_items all-reduce     Trainer._get_num_items_in_batch (the global loss-token count; a collective)
  forward + loss              DistSFTTrainer.compute_loss -> TRL's SFTTrainer.compute_loss -> model forward
  TRL metric gathers          Accelerator.gather_for_metrics inside TRL's compute_loss (entropy, accuracy,
                              token counts: collectives per micro-batch)
  backward (no_sync)          Accelerator.backward of the micro-batches under DDP no_sync
  backward + DDP all-reduce   Accelerator.backward of the last micro-batch (DDP reduces the gradients
                              during it; "exposed all-reduce" below = this minus the no_sync backward)
  grad clip                   Trainer._clip_grad_norm / _get_grad_norm
  optimizer step / scheduler / zero_grad
  distsft per-step all-reduce PreemptionCallback.on_step_end (the preemption agreement)
  distsft log all-reduce      DistSFTTrainer._reduce_window (two small collectives per log)
  logging + callbacks         Trainer._maybe_log_save_evaluate and the callback handler, minus the above
  other (HF loop)             the step's wall time minus everything above
A step = from the end of one Trainer._maybe_log_save_evaluate to the end of the next. Steps 1..skip are
dropped (warm-up). Rank 0's figures are reported (rank 1's are similar; both are written to the work dir).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

ORDER = ["data: sampler + Arrow rows", "data: collate", "HF num_items all-reduce", "forward + loss",
         "TRL metric gathers", "backward (no_sync)", "backward + DDP all-reduce", "grad clip", "optimizer step",
         "scheduler", "zero_grad", "distsft per-step all-reduce", "distsft log all-reduce", "logging + callbacks",
         "other (HF loop)"]


# --------------------------------------------------------------------------- rank side

class Timers:
    def __init__(self) -> None:
        self.stack: list[list] = []  # [label, t0, child_seconds]
        self.cur: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        self.last_end: float | None = None
        self.counts: dict[str, int] = defaultdict(int)

    def wrap(self, owner: object, name: str, label: str | callable) -> None:
        orig = getattr(owner, name)
        timers = self

        def wrapped(*args, **kwargs):
            lab = label(*args, **kwargs) if callable(label) else label
            timers.stack.append([lab, time.perf_counter(), 0.0])
            try:
                return orig(*args, **kwargs)
            finally:
                lab, t0, child = timers.stack.pop()
                dur = time.perf_counter() - t0
                timers.cur[lab] += dur - child
                timers.counts[lab] += 1
                if timers.stack:
                    timers.stack[-1][2] += dur
        wrapped.__wrapped__ = orig
        setattr(owner, name, wrapped)

    def end_step(self, logged: bool) -> None:
        now = time.perf_counter()
        if self.last_end is not None:
            rec = dict(self.cur)
            rec["wall"] = now - self.last_end
            rec["other (HF loop)"] = rec["wall"] - sum(v for k, v in self.cur.items())
            rec["logged"] = logged
            self.steps.append(rec)
        self.cur = defaultdict(float)
        self.last_end = time.perf_counter()


def rank_main(run_yaml: str, out: Path) -> None:
    import accelerate
    import accelerate.optimizer
    import accelerate.scheduler
    import torch
    from transformers import Trainer
    from transformers.trainer_callback import CallbackHandler

    from distsft.runtime import dist
    from distsft.train import recipe, trainer as dtrainer

    T = Timers()
    info: dict = {}
    T.wrap(Trainer, "get_batch_samples", "data: sampler + Arrow rows")
    T.wrap(Trainer, "_get_num_items_in_batch", "HF num_items all-reduce")
    T.wrap(dtrainer.DistSFTTrainer, "compute_loss", "forward + loss")
    T.wrap(accelerate.Accelerator, "gather_for_metrics", "TRL metric gathers")
    T.wrap(accelerate.Accelerator, "backward",
           lambda self, *a, **k: "backward + DDP all-reduce" if self.sync_gradients else "backward (no_sync)")
    T.wrap(Trainer, "_clip_grad_norm", "grad clip")
    T.wrap(Trainer, "_get_grad_norm", "grad clip")
    T.wrap(accelerate.optimizer.AcceleratedOptimizer, "step", "optimizer step")
    T.wrap(accelerate.scheduler.AcceleratedScheduler, "step", "scheduler")
    T.wrap(torch.nn.Module, "zero_grad", "zero_grad")
    T.wrap(dtrainer.PreemptionCallback, "on_step_end", "distsft per-step all-reduce")
    T.wrap(dtrainer.DistSFTTrainer, "_reduce_window", "distsft log all-reduce")
    T.wrap(CallbackHandler, "call_event", "logging + callbacks")
    T.wrap(Trainer, "_maybe_log_save_evaluate", "logging + callbacks")

    # the step boundary: after _maybe_log_save_evaluate (the outermost wrapper runs last)
    inner = Trainer._maybe_log_save_evaluate

    def step_boundary(self, *args, **kwargs):
        logged = self.control.should_log if hasattr(self, "control") else False
        r = inner(self, *args, **kwargs)
        T.end_step(logged)
        return r
    Trainer._maybe_log_save_evaluate = step_boundary

    # distsft's collate runs inside the DataLoader: wrap the collate_fn of the loader it builds
    get_loader = dtrainer.DistSFTTrainer.get_train_dataloader

    def timed_loader(self):
        loader = get_loader(self)
        T.wrap(loader, "collate_fn", "data: collate")
        m = self.model
        info["activation_checkpointing"] = bool(getattr(m, "is_gradient_checkpointing", False))
        info["args.activation_checkpointing"] = bool(getattr(self.args, "activation_checkpointing",
                                                             getattr(self.args, "gradient_checkpointing", False)))
        info["attn_implementation"] = getattr(m.config, "_attn_implementation", None)
        return loader
    dtrainer.DistSFTTrainer.get_train_dataloader = timed_loader

    # the model is checkpointing only once train() has enabled it: read it again at the first step end
    orig_pre = dtrainer.PreemptionCallback.on_step_end

    def probe(self, args, state, control, **kwargs):
        model = kwargs.get("model")
        if model is not None and "model.is_gradient_checkpointing (during training)" not in info:
            core = getattr(model, "module", model)
            info["model.is_gradient_checkpointing (during training)"] = bool(getattr(core, "is_gradient_checkpointing", False))
        return orig_pre(self, args, state, control, **kwargs)
    dtrainer.PreemptionCallback.on_step_end = probe

    code = recipe.run_rank(run_yaml)
    e = dist.env()
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile-rank{e.rank}.json").write_text(json.dumps({"steps": T.steps, "info": info,
                                                                  "threads": torch.get_num_threads()}))
    if dist.initialized():
        import torch.distributed as tdist
        tdist.destroy_process_group()
    sys.exit(code)


# --------------------------------------------------------------------------- driver

def driver(a: argparse.Namespace) -> None:
    import subprocess
    import common as C
    from distsft.launch.local import prepare
    from distsft.launch.run_files import launch_env, write_run_dir
    from distsft.config.spec import load_spec

    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    data = C.make_data(C.DEFAULT_WORK, a.n)
    out = C.fresh(work / "run")
    spec_path = C.write_spec(work / "profile.yaml", data=data, output_dir=out, max_steps=a.steps,
                             logging_steps=a.logging_steps)
    os.environ["DISTSFT_CACHE_DIR"] = str(work / "distsft-cache")
    spec = load_spec(str(spec_path), [], gpus=C.WORLD)
    paths = write_run_dir(spec, out, cuda=False, bf16_supported=False)
    prepare(spec, cuda=False)
    env = C.bench_env(DISTSFT_CACHE_DIR=str(work / "distsft-cache"), DISTSFT_LOCK_HELD="1",
                      OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // C.WORLD)), DS_ACCELERATOR="cpu",
                      **launch_env(spec, cuda=False))
    prof = C.fresh(work / "profile")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(paths["accelerate"]),
           str(Path(__file__).resolve()), "--rank", str(paths["run"]), "--out", str(prof)]
    print("ranks: " + " ".join(cmd), file=sys.stderr, flush=True)
    r = subprocess.run(cmd, env=env, cwd=str(C.ROOT), capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"profiled run failed ({r.returncode}):\n{(r.stdout + r.stderr)[-4000:]}")
    ranks = [json.loads((prof / f"profile-rank{i}.json").read_text()) for i in range(C.WORLD)]

    print(f"\n`{C.command_line()}`  ")
    print(f"{C.machine()}; {C.versions()}  ")
    info = ranks[0]["info"]
    print(f"{a.n:,} chats, max_length {C.MAX_LENGTH}, global batch {C.GLOBAL_BATCH} = {C.PER_DEVICE} x {C.ACCUM} x "
          f"{C.WORLD} CPU ranks ({ranks[0]['threads']} thread each), logging every {a.logging_steps} steps, "
          f"steps {a.skip + 1}..{a.steps}; spec train.gradient_checkpointing=false; observed: {json.dumps(info)}\n")

    def table(steps: list[dict], title: str) -> None:
        wall = sum(s["wall"] for s in steps)
        print(f"{title}: {len(steps)} steps, mean step {wall / len(steps) * 1000:.0f} ms\n")
        print("| part | ms per step (mean) | share |")
        print("|---|---|---|")
        for k in ORDER:
            v = sum(s.get(k, 0.0) for s in steps)
            print(f"| {k} | {v / len(steps) * 1000:.1f} | {100 * v / wall:.1f}% |")
        print(f"| **step wall** | {wall / len(steps) * 1000:.1f} | 100% |")
        ns = sum(s.get("backward (no_sync)", 0.0) for s in steps) / len(steps)
        sy = sum(s.get("backward + DDP all-reduce", 0.0) for s in steps) / len(steps)
        per_mb_nosync = ns / max(1, C.ACCUM - 1)
        exposed = sy - per_mb_nosync
        coll = (exposed + sum(s.get(k, 0.0) for s in steps for k in (
            "HF num_items all-reduce", "TRL metric gathers", "distsft per-step all-reduce", "distsft log all-reduce"))
            / len(steps))
        print(f"\nexposed DDP all-reduce ≈ backward(sync) − backward(no_sync) = {exposed * 1000:.1f} ms/step "
              f"({100 * exposed / (wall / len(steps)):.1f}%); all collectives together ≈ {coll * 1000:.1f} ms/step "
              f"({100 * coll / (wall / len(steps)):.1f}%)\n")

    for rank in (0, 1):
        steps = ranks[rank]["steps"][a.skip:]
        table(steps, f"rank {rank}")
        logged = [s for s in steps if s.get("logged")]
        if rank == 0 and logged:
            per_log = statistics.mean(s.get("distsft log all-reduce", 0) + s.get("logging + callbacks", 0) for s in logged)
            per_nolog = statistics.mean(s.get("distsft log all-reduce", 0) + s.get("logging + callbacks", 0)
                                        for s in steps if not s.get("logged")) if len(logged) < len(steps) else 0.0
            print(f"rank 0 logging + callbacks + log all-reduce: {per_log * 1000:.1f} ms on a logging step, "
                  f"{per_nolog * 1000:.1f} ms on the others\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--steps", type=int, default=18)
    ap.add_argument("--skip", type=int, default=3)
    ap.add_argument("--logging-steps", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path(os.environ.get("DISTSFT_BENCH_DIR", "/tmp/distsft-bench")) / "profile")
    ap.add_argument("--rank", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rank:
        rank_main(a.rank, a.out)
    else:
        driver(a)


if __name__ == "__main__":
    main()
