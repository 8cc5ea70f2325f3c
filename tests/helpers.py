"""Shared helpers for end-to-end tests: run the real `distsft` command in a subprocess."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-llama"
TRAIN = ROOT / "examples" / "data" / "train.jsonl"
EVAL = ROOT / "examples" / "data" / "eval.jsonl"
DISTSFT = [sys.executable, "-m", "distsft.cli"]


# ChatML whose turns end with <|eos|>: a special token of the tiny tokenizer, but not its eos (<|im_end|>).
TURN_END_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|eos|>\\n' }}"
                     "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_spec(path: Path, output_dir: Path, extra: str = "") -> Path:
    """A small, fast spec on the tiny model: fp32, logging every step, no periodic checkpoints."""
    path.write_text(f"""
model:
  name_or_path: {TINY}
data:
  train_files: {TRAIN}
  eval_files: {EVAL}
  max_length: 256
train:
  per_device_train_batch_size: 2
  global_batch_size: 8
  learning_rate: 2.0e-3
  max_steps: 8
  warmup_ratio: 0.1
  bf16: false
logging:
  logging_steps: 1
checkpoint:
  save_steps: 1000
output_dir: {output_dir}
{extra}
""")
    return path


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.setdefault("DISTSFT_CACHE_DIR", str(ROOT / ".pytest-data-cache"))
    e["PYTHONUNBUFFERED"] = "1"
    return e


def run(*args: str, timeout: int = 300, check: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run([*DISTSFT, *map(str, args)], capture_output=True, text=True, timeout=timeout, env=env(),
                       cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"distsft {' '.join(map(str, args))} exited {p.returncode}\n"
                             f"--- stdout\n{p.stdout[-4000:]}\n--- stderr\n{p.stderr[-6000:]}")
    return p


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*DISTSFT, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env(), cwd=ROOT)


def metrics(output_dir: Path) -> list[dict]:
    p = Path(output_dir) / "metrics.jsonl"
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.exists() else []


def train_losses(output_dir: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in metrics(output_dir) if "loss" in m}


def packed_token_loss(model, rows) -> tuple[float, int]:
    """Summed next-token loss and labelled-token count over packed rows, each example run alone (no
    packing, no collator): the independent reference the logged losses are checked against."""
    import torch
    total, count = 0.0, 0
    for row in rows:
        start = 0
        for n in row["seq_lengths"]:
            ids = torch.tensor(row["input_ids"][start:start + n])[None]
            labels = torch.tensor(row["labels"][start:start + n])[None]
            start += n
            with torch.no_grad():
                logits = model(input_ids=ids).logits.float()
            total += float(torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100,
                                                             reduction="sum"))
            count += int((labels[0, 1:] != -100).sum())
    return total, count


def packed_eval_loss(model, ds, pad_token_id: int) -> float:
    """Token-weighted eval loss over a packed split through the packed collator, 4 rows at a time (the
    reference a reloaded adapter is checked against)."""
    import torch
    from distsft.data.collate import PackedCollator
    collate = PackedCollator(pad_token_id, "sdpa")
    total, count = 0.0, 0
    for start in range(0, len(ds), 4):
        batch = collate([ds[i] for i in range(start, min(start + 4, len(ds)))])
        labels = batch.pop("labels")[..., 1:]
        with torch.no_grad():
            logits = model(**{**batch, "use_cache": False}).logits.float()  # packed masks need no cache
        total += float(torch.nn.functional.cross_entropy(logits[..., :-1, :].reshape(-1, logits.shape[-1]),
                                                         labels.reshape(-1), ignore_index=-100, reduction="sum"))
        count += int((labels != -100).sum())
    return total / count


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(m.get("step", 0) >= step and "loss" in m for m in metrics(output_dir)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc {proc.returncode}) before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll `predicate` until it returns something truthy (returned), or fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def clean(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
