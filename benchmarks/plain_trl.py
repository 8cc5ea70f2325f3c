"""Plain TRL supervised fine-tuning, written the way TRL's SFTTrainer documentation shows it: the peer
that distsft's throughput, launch overhead and memory are measured against.

    accelerate launch --multi_gpu --num_processes 2 benchmarks/plain_trl.py \
        --model examples/tiny-llama --data examples/data/train.jsonl --max-steps 20

The training part is the documented recipe and nothing else: model + tokenizer from the directory,
`load_dataset("json", data_files=...)` of the same `messages` data distsft trains on,
`SFTConfig(packing=True, max_length=..., assistant_only_loss=True, ...)` (the tiny template has
`{% generation %}` markers, so TRL masks everything but the assistant turns, like distsft), then
`SFTTrainer(...).train()`. Every rank tokenizes and packs the data itself at every start (TRL's way;
`datasets` may reuse its own map cache on a second start).

On a CPU machine: `accelerate launch` starts several ranks only with --multi_gpu (it is what makes it use
torchrun; --cpu with several processes goes to its MPI launcher), and each rank must then ask for the CPU
itself -- `SFTConfig(use_cpu=True)` -- or it sees no backend and believes it is alone; with it, HF
Trainer sets up gloo DDP. torchrun gives each rank OMP_NUM_THREADS=1, the same as `distsft run` gives on
2 cores.

Measurement only (nothing that changes the training): a TrainerCallback records time.time() at every
on_step_end, the collator is wrapped to count the real (non-padding) tokens of every micro-batch, and
at the end rank 0 gathers every rank's figures and prints one line

    PLAIN_TRL_RESULT {"first_step_s": ..., "tokens_per_s": ..., "steps_per_s": ..., "peak_rss_mb": [...], ...}

first_step_s: seconds from this rank's process start (psutil create_time) to the end of optimizer step
1; tokens_per_s / steps_per_s: real tokens (all ranks) and steps over steps 2..N divided by the time
from the end of step 1 to the end of step N; peak_rss_mb: VmHWM (peak resident memory) of each rank.
It also prints `PLAIN_TRL first_step <time.time()> {phases}` the moment step 1 ends (for
launch_overhead.py) and `PLAIN_TRL step K` at every step end (throughput_vs_trl.py snapshots the ranks'
CPU time on those lines).

GPU runs (gpu_throughput.py) add --bf16, --attn flash_attention_2 and --no-packing (padded batches).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

T_MAIN = time.time()


def vm_hwm_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="examples/tiny-llama")
    ap.add_argument("--data", default="examples/data/train.jsonl")
    ap.add_argument("--output-dir", default="/tmp/plain-trl-out")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--per-device", type=int, default=4)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--logging-steps", type=int, default=1)
    ap.add_argument("--learning-rate", type=float, default=3e-3)
    ap.add_argument("--gradient-checkpointing", choices=["default", "on", "off"], default="default",
                    help="default: SFTConfig's own default (True in TRL 1.x)")
    ap.add_argument("--save-steps", type=int, default=0, help="0: no checkpoints")
    ap.add_argument("--resume", default=None, help="a checkpoint directory to resume from")
    ap.add_argument("--result", default=None, help="also write the result JSON here (rank 0)")
    ap.add_argument("--bf16", action="store_true", help="bf16 mixed precision (GPU runs)")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, flash_attention_2)")
    ap.add_argument("--no-packing", action="store_true", help="pad each micro-batch instead of packing")
    a = ap.parse_args()

    import psutil
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    proc_start = psutil.Process().create_time()
    t_imports = time.time()

    # ---------------------------------------------------------------- the documented recipe
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn)
    dataset = load_dataset("json", data_files=a.data, split="train")
    gc = {} if a.gradient_checkpointing == "default" else {"gradient_checkpointing": a.gradient_checkpointing == "on"}
    training_args = SFTConfig(
        output_dir=a.output_dir,
        max_length=a.max_length,
        packing=not a.no_packing,
        assistant_only_loss=True,
        per_device_train_batch_size=a.per_device,
        gradient_accumulation_steps=a.accum,
        learning_rate=a.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(0.05 * a.max_steps),
        weight_decay=0.01,
        max_steps=a.max_steps,
        logging_steps=a.logging_steps,
        save_strategy="steps" if a.save_steps else "no",
        save_steps=a.save_steps or 500,
        bf16=a.bf16,
        use_cpu=not torch.cuda.is_available(),
        seed=42,
        report_to="none",
        disable_tqdm=True,
        **gc,
    )

    # ---------------------------------------------------------------- measurement only
    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            now = time.time()
            self.times.append(now)
            if state.is_world_process_zero:
                if state.global_step == 1:
                    phases = {"proc_start": proc_start, "imports_s": t_imports - proc_start,
                              "load_s": t_trainer - t_imports, "prepare_dataset_s": t_prepared - t_trainer,
                              "until_first_step_s": now - t_prepared}
                    print(f"PLAIN_TRL first_step {now:.3f} {json.dumps(phases)}", flush=True)
                print(f"PLAIN_TRL step {state.global_step}", flush=True)

    timer = StepTimes()
    t_trainer = t_prepared = time.time()
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=[timer])
    t_prepared = time.time()  # noqa: F841 (read by StepTimes)

    counts: list[int] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        counts.append(sum(len(e["input_ids"]) for e in examples))  # rows carry no padding: the collator pads
        return collate(examples)

    trainer.data_collator = counting_collator
    # ---------------------------------------------------------------- train
    trainer.train(resume_from_checkpoint=a.resume)

    import torch.distributed as dist
    mine = {"times": timer.times, "counts": counts, "hwm_mb": vm_hwm_mb(), "proc_start": proc_start,
            "t_main": T_MAIN, "t_imports": t_imports, "t_trainer": t_trainer, "t_prepared": t_prepared,
            "threads": torch.get_num_threads(), "rank": int(os.environ.get("RANK", 0))}
    ranks = [mine]
    if dist.is_available() and dist.is_initialized():
        ranks = [None] * dist.get_world_size()
        dist.all_gather_object(ranks, mine)
    if trainer.is_world_process_zero():
        r0 = ranks[0]
        times = r0["times"]
        first = trainer.state.global_step - len(times) + 1  # a resume starts after the checkpoint's step
        n = len(times)
        steady_tokens = sum(sum(r["counts"][a.accum:a.accum * n]) for r in ranks)
        steady_s = times[-1] - times[0] if n > 1 else float("nan")
        res = {
            "first_step": first,
            "first_step_s": times[0] - r0["proc_start"],
            "first_step_time": times[0],
            "proc_start": r0["proc_start"],
            "imports_s": r0["t_imports"] - r0["proc_start"],
            "load_s": r0["t_trainer"] - r0["t_imports"],
            "prepare_dataset_s": r0["t_prepared"] - r0["t_trainer"],
            "steps": n,
            "tokens_per_s": steady_tokens / steady_s if n > 1 else None,
            "steps_per_s": (n - 1) / steady_s if n > 1 else None,
            "tokens_per_step": steady_tokens / (n - 1) if n > 1 else None,
            "peak_rss_mb": [r["hwm_mb"] for r in ranks],
            "threads": [r["threads"] for r in ranks],
            "step_tokens": [sum(sum(r["counts"][a.accum * k:a.accum * (k + 1)]) for r in ranks) for k in range(n)],
            "step_times": [t1 - t0 for t0, t1 in zip(times, times[1:])],
            "gradient_checkpointing": bool(training_args.gradient_checkpointing),
            "num_rows": len(trainer.train_dataset),
        }
        print("PLAIN_TRL_RESULT " + json.dumps(res), flush=True)
        if a.result:
            Path(a.result).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
