"""Shared helpers of the distsft-vs-plain-TRL benchmarks (not a benchmark itself).

* `make_data`: N synthetic chats from examples/make_tiny.py's generator (another seed than the
  committed examples/data, same task mix), written once per (n, seed) under the work directory.
* `write_spec`: a distsft run spec for the tiny model with the settings a comparison needs.
* `run_logged`: start a command in its own session, timestamp every stdout line as it arrives, poll
  the peak RSS (VmHWM of /proc/PID/status: the high-water mark of the process' own memory, which is
  monotonic, so the last poll is the peak) of every rank process, and optionally kill the whole
  process tree as soon as a line matches (launch-overhead runs stop at the first optimizer step).
* `distsft_cmd` / `plain_trl_cmd`: the two commands compared, 2 CPU ranks each.

All outputs go under a work directory in /tmp (never the repository).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-llama"
BENCH = ROOT / "benchmarks"
BIN = Path(sys.executable).parent
DEFAULT_WORK = Path(os.environ.get("DISTSFT_BENCH_DIR", "/tmp/distsft-bench"))

# The comparison's settings (the quickstart's model, sequence length and global batch, 2 CPU ranks).
MAX_LENGTH = 512
PER_DEVICE = 4
ACCUM = 2
WORLD = 2
GLOBAL_BATCH = PER_DEVICE * ACCUM * WORLD
LR = 3e-3
SEED = 42


# --------------------------------------------------------------------------- data

def _make_tiny():
    spec = importlib.util.spec_from_file_location("make_tiny", ROOT / "examples" / "make_tiny.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    return mt


def make_data(work: Path, n: int, seed: int = 7) -> Path:
    """examples/make_tiny.py's `conversation` generator, `n` chats, JSON Lines; reused when present."""
    path = Path(work) / "data" / f"chats-{n}-seed{seed}.jsonl"
    if path.exists():
        return path
    mt = _make_tiny()
    rng = random.Random(seed)
    words = mt.make_words(random.Random(mt.SEED))  # the tokenizer's vocabulary
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with tmp.open("w") as f:
        for _ in range(n):
            f.write(json.dumps(mt.conversation(rng, words)) + "\n")
    tmp.rename(path)
    return path


# --------------------------------------------------------------------------- commands

def write_spec(path: Path, *, data: Path, output_dir: Path, max_steps: int, logging_steps: int = 1,
               save_steps: int | None = None, max_length: int = MAX_LENGTH, per_device: int = PER_DEVICE,
               global_batch: int = GLOBAL_BATCH, gradient_checkpointing: bool = False,
               resume: str = "never", extra: dict[str, dict[str, Any]] | None = None) -> Path:
    import yaml
    spec: dict[str, Any] = {
        "model": {"name_or_path": str(TINY), "attn_implementation": "sdpa"},
        "data": {"train_files": [str(data)], "format": "messages", "max_length": max_length, "packing": True},
        "train": {"per_device_train_batch_size": per_device, "global_batch_size": global_batch,
                  "learning_rate": LR, "max_steps": max_steps, "warmup_ratio": 0.05,
                  "lr_scheduler_type": "cosine", "weight_decay": 0.01, "seed": SEED, "bf16": False,
                  "gradient_checkpointing": gradient_checkpointing},
        "distributed": {"gpus_per_node": WORLD, "backend": "ddp"},
        "logging": {"report_to": ["jsonl"], "logging_steps": logging_steps},
        "checkpoint": {"save_steps": save_steps, "resume": resume},
        "output_dir": str(output_dir),
    }
    for section, values in (extra or {}).items():
        spec.setdefault(section, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def distsft_cmd(spec: Path) -> list[str]:
    return [str(BIN / "distsft"), "run", str(spec), "--gpus", str(WORLD)]


def plain_trl_cmd(*, data: Path, output_dir: Path, max_steps: int, result: Path, logging_steps: int = 1,
                  max_length: int = MAX_LENGTH, per_device: int = PER_DEVICE, accum: int = ACCUM,
                  gradient_checkpointing: str = "default", extra: list[str] | None = None,
                  num_processes: int = WORLD) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes 2 benchmarks/plain_trl.py ...` (see plain_trl.py for
    why --multi_gpu on a CPU machine)."""
    multi = ["--multi_gpu"] if num_processes > 1 else []
    return [str(BIN / "accelerate"), "launch", *multi, "--num_processes", str(num_processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            str(BENCH / "plain_trl.py"), "--model", str(TINY), "--data", str(data),
            "--output-dir", str(output_dir), "--max-steps", str(max_steps), "--logging-steps", str(logging_steps),
            "--max-length", str(max_length), "--per-device", str(per_device), "--accum", str(accum),
            "--gradient-checkpointing", gradient_checkpointing, "--result", str(result), *(extra or [])]


def bench_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
               TRANSFORMERS_VERBOSITY="error", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ACCELERATE_USE_CPU"):
        env.pop(k, None)  # each launcher decides (both end at 1 thread per rank on 2 cores)
    env.update(extra)
    return env


# --------------------------------------------------------------------------- running

def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@dataclass
class Run:
    cmd: list[str]
    t0: float                                   # time.time() just before the process started
    lines: list[tuple[float, str]] = field(default_factory=list)
    rc: int | None = None
    killed: bool = False
    rank_hwm_mb: dict[int, float] = field(default_factory=dict)  # pid -> peak RSS
    wall: float = 0.0
    root_hwm_mb: float = 0.0  # peak RSS of the started process itself (distsft's launcher)
    tree_cpu: float | None = None  # CPU seconds of the whole process tree when `stop_on` matched
    # name -> (time.time(), {pid: CPU seconds (user+system) of each rank}) when a `marks` line arrived
    cpu_at: dict[str, tuple[float, dict[int, float]]] = field(default_factory=dict)

    def cpu_between(self, a: str, b: str) -> float | None:
        """CPU seconds all ranks spent between two marks: the work, nearly blind to other users' load
        (1 thread per rank, and gloo waits block instead of spinning)."""
        if a not in self.cpu_at or b not in self.cpu_at:
            return None
        ca, cb = self.cpu_at[a][1], self.cpu_at[b][1]
        return sum(cb[p] - ca[p] for p in cb if p in ca)

    def first(self, pattern: str) -> float | None:
        """Seconds from the start to the first stdout line matching `pattern`."""
        rx = re.compile(pattern)
        for t, line in self.lines:
            if rx.search(line):
                return t - self.t0
        return None

    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _tree(pid: int) -> list[Any]:
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _is_rank(p: Any, rank_pattern: str) -> bool:
    cl = " ".join(p.cmdline())
    # ranks only: not the accelerate/torchrun launcher whose command line names them too
    return rank_pattern in cl and "accelerate" not in cl and "torchrun" not in cl


def rank_cpu(root_pid: int, rank_pattern: str) -> dict[int, float]:
    import psutil
    out = {}
    for p in _tree(root_pid):
        try:
            if _is_rank(p, rank_pattern):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        except psutil.Error:
            continue
    return out


def tree_cpu(root_pid: int) -> float:
    """CPU seconds used so far by a process and all its descendants (live ones, plus the children they
    have already reaped)."""
    import psutil
    total = 0.0
    try:
        procs = [psutil.Process(root_pid), *_tree(root_pid)]
    except psutil.Error:
        return float("nan")
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return total


def run_logged(cmd: list[str], *, env: dict[str, str] | None = None, rank_pattern: str,
               stop_on: str | None = None, timeout: float = 900, echo: bool = False,
               cwd: Path | None = None, marks: dict[str, str] | None = None) -> Run:
    """Run `cmd`, timestamping its stdout+stderr lines; poll VmHWM of descendants whose command line
    contains `rank_pattern`; kill the process tree once a line matches `stop_on`. `marks`: name ->
    regex; the ranks' CPU times are snapshotted when a matching line arrives (names starting with
    "last" keep the last match, others the first)."""
    import psutil
    mark_rx = {k: re.compile(v) for k, v in (marks or {}).items()}
    run = Run(cmd=cmd, t0=time.time())
    proc = subprocess.Popen(cmd, env=env or bench_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1, start_new_session=True, cwd=str(cwd or ROOT))
    stop = threading.Event()
    stop_rx = re.compile(stop_on) if stop_on else None

    def poll() -> None:
        while not stop.is_set():
            root = _vm_hwm_mb(proc.pid)
            if root is not None:
                run.root_hwm_mb = max(run.root_hwm_mb, root)
            for p in _tree(proc.pid):
                try:
                    if _is_rank(p, rank_pattern):
                        hwm = _vm_hwm_mb(p.pid)
                        if hwm is not None:
                            run.rank_hwm_mb[p.pid] = max(hwm, run.rank_hwm_mb.get(p.pid, 0.0))
                except psutil.Error:
                    continue
            stop.wait(0.25)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    assert proc.stdout is not None
    deadline = run.t0 + timeout
    for line in proc.stdout:
        now = time.time()
        line = line.rstrip("\n")
        run.lines.append((now, line))
        for name, rx in mark_rx.items():
            if rx.search(line) and (name.startswith("last") or name not in run.cpu_at):
                run.cpu_at[name] = (now, rank_cpu(proc.pid, rank_pattern))
        if echo:
            print(f"  [{now - run.t0:7.2f}] {line}", flush=True)
        if (stop_rx and stop_rx.search(line)) or now > deadline:
            run.tree_cpu = tree_cpu(proc.pid)
            run.killed = True
            kill_tree(proc)
            break
    try:
        run.rc = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        run.rc = proc.wait()
    run.wall = time.time() - run.t0
    stop.set()
    poller.join()
    # Ranks killed with the tree: wait until they are gone before the next run starts.
    return run


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process this harness started and all its descendants (distsft's launcher starts
    accelerate in a session of its own, so a process-group kill would miss the ranks)."""
    import psutil
    procs = _tree(proc.pid)
    try:
        procs.append(psutil.Process(proc.pid))
    except psutil.Error:
        pass
    for p in procs:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=30)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    return out


def distsft_steady(metrics: list[dict[str, Any]], skip: int = 1) -> dict[str, float]:
    """Real tokens/s and steps/s over the logged steps after the first `skip` ones (logging_steps=1:
    each record's `tokens` is that step's global real-token count and `step_time` the time since the
    previous step's log)."""
    recs = [m for m in metrics if "loss" in m and "step_time" in m and m["step"] > skip]
    if not recs:
        raise RuntimeError("no steady-state steps logged")
    out = steady([m["tokens"] for m in recs], [m["step_time"] for m in recs])
    out["peak_rss_gb_logged"] = max(m["peak_memory_gb"] for m in recs)
    return out


def steady(step_tokens: list[float], step_times: list[float]) -> dict[str, float]:
    """Means over the steady steps, and the median step (robust to bursts of load from other users of
    the machine: a burst inflates a few steps, the median step ignores them)."""
    import statistics
    tokens, seconds = sum(step_tokens), sum(step_times)
    med_t = statistics.median(step_times)
    return {"tokens_per_s": tokens / seconds, "steps_per_s": len(step_times) / seconds, "steps": len(step_times),
            "tokens_per_step": tokens / len(step_times), "median_step_s": med_t,
            "median_tokens_per_s": statistics.median(k / t for k, t in zip(step_tokens, step_times)),
            "median_steps_per_s": 1 / med_t}


def plain_result(run: Run) -> dict[str, Any]:
    for _, line in reversed(run.lines):
        if line.startswith("PLAIN_TRL_RESULT "):
            return json.loads(line[len("PLAIN_TRL_RESULT "):])
    raise RuntimeError("plain_trl.py printed no result line; its output ends with:\n" + run.text()[-3000:])


def check(run: Run, what: str) -> None:
    if run.rc != 0 and not run.killed:
        raise RuntimeError(f"{what} failed (exit {run.rc}): {' '.join(run.cmd)}\n{run.text()[-4000:]}")


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    return path


def versions() -> str:
    import accelerate
    import datasets
    import torch
    import transformers
    import trl
    import distsft  # noqa: F401
    return (f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"trl {trl.__version__}, accelerate {accelerate.__version__}, datasets {datasets.__version__}")


def machine() -> str:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} CPU cores ({cpu}), {mem:.0f} GiB RAM, no GPU"


def command_line() -> str:
    return "python " + " ".join([str(Path(sys.argv[0]).relative_to(ROOT)) if Path(sys.argv[0]).is_absolute()
                                 and ROOT in Path(sys.argv[0]).parents else sys.argv[0], *sys.argv[1:]])


def fmt(x: float, nd: int = 2) -> str:
    return f"{x:,.{nd}f}"
