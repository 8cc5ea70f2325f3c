"""TensorBoard and W&B sinks for `metrics.MetricsWriter` (JSONL is the writer's own).

Records arrive already reduced across ranks and are written by rank 0 only: a second writer would
mean a second TensorBoard file set or a second W&B run for the same job.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

from distsft.runtime import dist
from distsft.config.spec import RunSpec
from distsft import rundir
from distsft.runtime import envvars

TENSORBOARD_DIR = rundir.TENSORBOARD
WANDB_ID_FILE = rundir.WANDB_RUN_ID


def _numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalar_tags(record: dict[str, Any]) -> dict[str, float]:
    """`train/<key>` for a training record, `eval/<key>` (the `eval_` prefix dropped) for an eval one,
    so both dashboards group the curves the same way."""
    is_eval = any(k.startswith("eval_") for k in record)
    section = "eval" if is_eval else "train"
    # A key that is already a tag (`eval/<task>/<metric>` from `distsft eval`) keeps its name.
    return {k if "/" in k else f"{section}/{k.removeprefix('eval_')}": float(v) for k, v in record.items()
            if k != "step" and _numeric(v)}


def _generations_markdown(gens: list[dict[str, str]]) -> str:
    # TensorBoard renders text as Markdown; a table keeps prompt and completion side by side.
    def cell(s: str) -> str:
        return s.replace("|", "\\|").replace("\n", "<br>")
    rows = [f"| {cell(g['prompt'])} | {cell(g['completion'])} |" for g in gens]
    return "\n".join(["| prompt | completion |", "|---|---|", *rows])


def tensorboard_dir(output_dir: Path, run_name: str | None = None) -> Path:
    """tensorboard/ or, with logging.run_name, tensorboard/RUN_NAME: `tensorboard --logdir` on a parent
    directory of several runs then lists each under its name."""
    return Path(output_dir) / TENSORBOARD_DIR / run_name if run_name else Path(output_dir) / TENSORBOARD_DIR


class TensorBoardSink:
    def __init__(self, output_dir: Path, resume_step: int = 0, run_name: str | None = None):
        from torch.utils.tensorboard import SummaryWriter
        # purge_step drops events logged after the checkpoint we resume from (a crash can leave some),
        # as the JSONL sink does, so every step has one point.
        self._w = SummaryWriter(log_dir=str(tensorboard_dir(output_dir, run_name)),
                                purge_step=resume_step + 1 if resume_step > 0 else None)

    def write(self, record: dict[str, Any]) -> None:
        step = int(record.get("step", 0))
        if "generations" in record:
            self._w.add_text("generations", _generations_markdown(record["generations"]), step)
        if "warning" in record:
            self._w.add_text("warnings", str(record["warning"]), step)
        for tag, value in scalar_tags(record).items():
            self._w.add_scalar(tag, value, step)
        self._w.flush()  # a killed job keeps what it logged

    def close(self) -> None:
        self._w.close()


def _redact(value: Any, secret: str | None) -> Any:
    """Replace the API key wherever a spec string holds it (e.g. an `export` line in slurm.setup)."""
    if not secret:
        return value
    if isinstance(value, dict):
        return {k: _redact(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v, secret) for v in value]
    if isinstance(value, str):
        return value.replace(secret, "***")
    return value


def wandb_run_id(output_dir: Path) -> str:
    """One W&B run per job: the id is made once and reused when the job resumes or is requeued."""
    path = output_dir / WANDB_ID_FILE
    if path.exists() and path.read_text().strip():
        return path.read_text().strip()
    run_id = secrets.token_hex(4)  # W&B's own id shape: 8 lower-case alphanumerics
    path.write_text(run_id + "\n")
    return run_id


class WandbSink:
    def __init__(self, output_dir: Path, spec: RunSpec):
        import wandb
        self._wandb = wandb
        # Offline unless the user asked otherwise: a job must not fail (or hang) for want of a network,
        # and `wandb sync OUTPUT_DIR/wandb/offline-run-*` uploads it later.
        mode = None if envvars.wandb_mode_set() else "offline"
        self.run = wandb.init(
            project=spec.logging.wandb_project or "distsft", id=wandb_run_id(output_dir), resume="allow",
            dir=str(output_dir), mode=mode, name=rundir.run_name(spec),
            entity=spec.logging.wandb_entity, tags=list(spec.logging.wandb_tags) or None,
            config=_redact(spec.to_dict(), envvars.wandb_api_key()), reinit="create_new")
        # Steps are ours, not W&B's counter: a resumed job logs steps W&B has already seen, which its
        # own step would silently drop.
        self.run.define_metric("train/global_step")
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)

    def write(self, record: dict[str, Any]) -> None:
        data: dict[str, Any] = scalar_tags(record)
        if "generations" in record:
            data["generations"] = self._wandb.Table(
                columns=["step", "prompt", "completion"],
                data=[[record.get("step", 0), g["prompt"], g["completion"]] for g in record["generations"]])
        if data:
            data["train/global_step"] = int(record.get("step", 0))
            self.run.log(data)

    def close(self) -> None:
        self.run.finish()


def make_sinks(names: list[str], out: Path, spec: RunSpec, resume_step: int = 0) -> list[Any]:
    """Sinks for the `logging.report_to` names other than jsonl; each has write(record) and close()."""
    if dist.env().rank != 0:
        raise RuntimeError("metric sinks are created on rank 0 only (one TensorBoard log, one W&B run per job)")
    out = Path(out)
    sinks: list[Any] = []
    for name in names:
        if name == "tensorboard":
            sinks.append(TensorBoardSink(out, resume_step, run_name=spec.logging.run_name))
        elif name == "wandb":
            sinks.append(WandbSink(out, spec))
        elif name != "jsonl":
            raise ValueError(f"unknown metrics sink {name!r}")
    return sinks
