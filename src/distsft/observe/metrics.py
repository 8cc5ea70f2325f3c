"""Rank-0 metric sinks. Values arrive already reduced across ranks (see trainer.DistSFTTrainer.log);
only the main process constructs a `MetricsWriter`, so no other rank ever writes a file or a W&B run."""

from __future__ import annotations

import json
import math
from distsft import rundir
from pathlib import Path
from typing import Any

METRICS_FILE = rundir.METRICS


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the fact visible
    return value


class JsonlSink:
    def __init__(self, output_dir: Path, resume_step: int):
        self.path = output_dir / METRICS_FILE
        truncate_after(self.path, resume_step)
        self._f = open(self.path, "a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def close(self) -> None:
        self._f.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from: they will be logged again, and each step
    must appear once (a crash can leave steps logged past the newest complete checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill
        if int(rec.get("step", 0)) <= step:
            keep.append(line)
    path.write_text("".join(k + "\n" for k in keep))


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class MetricsWriter:
    """Fans one record out to the sinks chosen by `logging.report_to` (jsonl always)."""

    def __init__(self, output_dir: str | Path, report_to: list[str], resume_step: int, **sink_kwargs: Any):
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.sinks: list[Any] = [JsonlSink(out, resume_step)]
        extra = [r for r in report_to if r != "jsonl"]
        if extra:
            from distsft.observe.sinks import make_sinks  # TensorBoard / W&B, imported only when asked for
            self.sinks += make_sinks(extra, out, resume_step=resume_step, **sink_kwargs)

    def write(self, record: dict[str, Any]) -> None:
        for s in self.sinks:
            s.write(record)

    def close(self) -> None:
        for s in self.sinks:
            s.close()
