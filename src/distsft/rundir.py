"""Every name under OUTPUT_DIR, in one place: who writes each is said beside it, and every module that
reads or writes one of them takes the name from here (tests spell them literally: they are the contract).

Nothing here touches the disk except through the small path helpers; importing it costs nothing.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

# ----------------------------------------------------------------- written by the launcher (render)
RUN_YAML = "run.yaml"  # the resolved spec the ranks run (global batch pinned)
ACCELERATE_YAML = "accelerate.yaml"
DEEPSPEED_JSON = "deepspeed.json"  # deepspeed backend only
SUBMITIT = "submitit"  # SLURM: submitit's pickles and per-rank logs

# ----------------------------------------------------------------- written by rank 0 (observe/, train/)
METRICS = "metrics.jsonl"  # observe.metrics: one object per logging step, appended across resumes
RUN_RECORD = "run_record.jsonl"  # train.recipe: one line per start (who ran, how, resumed from what)
TENSORBOARD = "tensorboard"  # observe.sinks: tensorboard/RUN_NAME/
WANDB_RUN_ID = "wandb_run_id"  # observe.sinks: one W&B run id per job, reused on resume
MERGED = "merged"  # train.recipe: checkpoint.save_merged's merged model
LR_SCHEDULE_PNG = "lr_schedule.png"
LENGTH_HISTOGRAM_PNG = "length_histogram.png"
LOSS_CURVES_PNG = "loss_curves.png"
# plan.estimate: measured tokens/s per GPU, one line per measurement (`distsft sanity` on the host, rank 0
# at the end of every run), appended; `plan` reads it for the time estimate.
THROUGHPUT = "throughput.jsonl"
# train.autobatch: the micro-batch the GPU probe settled on for `per_device_train_batch_size: auto`
# (rank 0 writes it; plan.fit reads it so a resume uses the same).
AUTO_BATCH = "auto_batch.json"

# ----------------------------------------------------------------- written after training (posttrain/)
EVAL = "eval"  # posttrain.eval: eval/<checkpoint>/results.json, lm-eval's results (`distsft eval`)
EVAL_RESULTS = "results.json"
EVAL_LOG = "eval.log"  # launch.slurm: the afterok eval job's output (eval.after_training under submit)


def eval_results(output_dir: str | Path, checkpoint: str) -> Path:
    return Path(output_dir) / EVAL / str(checkpoint) / EVAL_RESULTS

# ----------------------------------------------------------------- checkpoint/ (both sides)
CHECKPOINT_PREFIX = "checkpoint-"  # checkpoint-STEP/: all ranks write, complete-or-absent
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MARKER = "distsft_complete.json"  # inside checkpoint-STEP/: checkpoint.store writes it last, reads it
PREEMPTED = "PREEMPTED"  # checkpoint.preempt: written, cleared and read there only
LOCK = ".distsft.lock"  # checkpoint.lock: the output-dir lock and its owner record
LOCK_OWNER = ".distsft.lock.owner"
SHARED_VIEW_CHECK = ".distsft-shared-view"  # checkpoint.shared_view: does every node see one directory?


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_step(path: str | Path) -> int | None:
    m = CHECKPOINT_RE.match(Path(path).name)
    return int(m.group(1)) if m else None


def preempted_file(output_dir: str | Path) -> Path:
    return Path(output_dir) / PREEMPTED


def run_name(spec: Any) -> str:
    """The run's name (W&B run name, tensorboard/RUN_NAME, the run record): logging.run_name, else the
    output directory's name."""
    return spec.logging.run_name or Path(spec.output_dir).name
