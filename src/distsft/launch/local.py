"""`distsft run`: resolve and render into output_dir, prepare the data once, then `accelerate launch`
the ranks on this machine, forwarding preemption signals to them and exiting with the training's code.

The launcher starts accelerate in its own session so a terminal's Ctrl-C reaches only this process,
which forwards it to the ranks (not to torchrun's agent, which would kill them before they save).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from distsft.checkpoint import store as checkpoint
from distsft.checkpoint import preempt
from distsft.checkpoint.lock import OutputLock
from distsft.runtime import dist
from distsft.checkpoint.preempt import EXIT_PREEMPTED, PREEMPT_SIGNALS
from distsft.config.spec import RunSpec, load_spec
from distsft.errors import SpecError

ENTRY_MODULE = "distsft.train"  # python -m distsft.train RUN_YAML: the per-rank entry


def ready_for_ranks(spec: RunSpec, cuda: bool) -> dict[str, Any]:
    """Everything that can fail on bad input, done once here so it fails before any rank starts (exit 2);
    it also leaves the tokenized, packed data in the cache for the ranks to memory-map."""
    from distsft.plan.batch import batch_for
    from distsft.train import preflight
    resume = checkpoint.resolve_resume(spec.checkpoint.resume, spec.output_dir)
    if resume is not None:
        from distsft.checkpoint.resume import check_resume_compatible
        from distsft.checkpoint.universal import convert_if_needed
        check_resume_compatible(checkpoint.read_marker(resume), spec, batch_for(spec))
        # Before the ranks start: a long conversion cannot time out a collective; a failure is one message.
        convert_if_needed(resume, batch_for(spec).world_size)
    preflight.check(spec)
    if spec.peft.method == "qlora":
        # In a child process: the probe's CUDA context on GPU 0 would stay with this launcher for the run.
        from distsft.launch.qlora_probe import probe
        probe("cuda" if cuda else "cpu")
    stats = _cached_stats(spec)
    if stats is None:
        from distsft.runtime.console import configure_logging
        from distsft.data.split import prepare_split
        from distsft.checkpoint.resume import train_data_key
        from distsft.train.tokens import load_tokenizer
        configure_logging(dist.env().is_main)
        tokenizer = load_tokenizer(spec)
        _, stats = prepare_split(spec, tokenizer, "train")
        if spec.data.has_eval:
            prepare_split(spec, tokenizer, "eval")
        key = train_data_key(spec, tokenizer)
    else:
        key = _cached_train_key(spec)
    if resume is not None and key is not None:
        from distsft.checkpoint.resume import check_data_unchanged
        check_data_unchanged(checkpoint.read_marker(resume), key)
    from distsft.plan.batch import steps
    t = spec.train
    steps(stats["num_rows"], batch_for(spec).global_batch_size, t.num_train_epochs, t.max_steps)  # enough rows?
    return stats


def _cached_train_key(spec: RunSpec) -> str | None:
    """The train split's cache key from the source-key index (the warm path has no tokenizer)."""
    from distsft.data.cache import INDEX_DIR, default_cache_root, source_key
    sk = source_key(spec, "train")
    try:
        return (default_cache_root(spec) / INDEX_DIR / sk).read_text().strip() if sk else None
    except OSError:
        return None


def _cached_stats(spec: RunSpec) -> dict[str, Any] | None:
    """The train split's stats when every split was already packed from these exact sources: the warm
    path, which skips loading the tokenizer (and importing transformers) just to find the cache."""
    from distsft.launch.prepare import cached
    found = cached(spec)
    return found["train"] if found else None


def _rank_processes(child: subprocess.Popen) -> list[psutil.Process]:
    try:
        procs = psutil.Process(child.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for p in procs:
        try:
            if ENTRY_MODULE in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


class SignalForwarder:
    """Forward TERM/INT/USR1/USR2 to the rank processes, which checkpoint at the next step and exit."""

    def __init__(self, child: subprocess.Popen):
        self.child, self.count = child, 0

    def __enter__(self) -> "SignalForwarder":
        self._old = {s: signal.signal(s, self._forward) for s in PREEMPT_SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def _forward(self, signum: int, frame: Any) -> None:
        self.count += 1
        ranks = _rank_processes(self.child)
        name = signal.Signals(signum).name
        if not ranks or self.count > 2:
            # Nothing to save yet (ranks not started), or asked three times: stop everything now.
            print(f"distsft: {name}: stopping all processes", file=sys.stderr, flush=True)
            os.killpg(self.child.pid, signal.SIGKILL if self.count > 2 else signal.SIGTERM)
            return
        print(f"distsft: {name}: asking {len(ranks)} rank(s) to save a checkpoint and stop "
              f"(send it twice more to kill)", file=sys.stderr, flush=True)
        for p in ranks:
            try:
                p.send_signal(signum)
            except psutil.Error:
                pass


def rendezvous_port(spec: RunSpec) -> int:
    """distributed.main_process_port (else torch's 29500), or the next free port when another process
    on this machine holds it: said once here, instead of accelerate's warning and a random port."""
    from distsft.runtime import ports
    wanted = ports.wanted(spec.distributed.main_process_port)
    port = ports.next_free(wanted)
    if port != wanted:
        print(f"distsft: port {wanted} is in use on this machine; the ranks rendezvous on port {port}", flush=True)
    return port


def launch(run_yaml: Path, accelerate_yaml: Path, output_dir: Path, extra_env: dict[str, str],
           port: int | None = None) -> int:
    """Start the ranks, forward signals to them, wait; the training's exit code."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_yaml),
           *(["--main_process_port", str(port)] if port else []), "-m", ENTRY_MODULE, str(run_yaml)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **extra_env)
    env[dist.LOCK_HELD_ENV] = "1"
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(1, _num_processes(accelerate_yaml)))))
    preempt.clear_preempted(output_dir)
    child = subprocess.Popen(cmd, env=env, start_new_session=True)
    with SignalForwarder(child):
        while True:
            try:
                rc = child.wait()
                break
            except InterruptedError:
                continue
    if preempt.was_preempted(output_dir):
        print(f"distsft: preempted; the newest complete checkpoint is in {output_dir}. "
              f"Rerun the same command to resume (exit code {EXIT_PREEMPTED}).", flush=True)
        return EXIT_PREEMPTED
    if rc != 0:
        print(f"distsft: training failed with exit code {rc}; see the rank messages above", file=sys.stderr)
    return rc if rc >= 0 else 128 - rc


def _num_processes(accelerate_yaml: Path) -> int:
    import yaml
    return int((yaml.safe_load(accelerate_yaml.read_text()) or {}).get("num_processes", 1))


def run(spec_path: str, overrides: list[str], gpus: int | None) -> int:
    from distsft.runtime.hardware import cuda_info, device_count
    from distsft.plan.report import make_plan
    from distsft.launch.run_files import launch_env, write_run_dir
    started = time.perf_counter()
    spec = load_spec(spec_path, overrides, gpus=gpus)
    if spec.distributed.nodes != 1:
        print(f"distsft run uses this machine only: distributed.nodes {spec.distributed.nodes} → 1 "
              "(use distsft submit for several nodes)")
        spec.distributed.nodes = 1
    cuda, bf16_ok, _ = cuda_info()
    n = spec.distributed.gpus_per_node
    if not cuda:
        print(f"distsft: no CUDA device: starting {n} CPU process{'es' if n > 1 else ''} over gloo")
    elif n > (count := device_count()):
        raise SpecError(f"--gpus {n} but this machine has {count} CUDA device(s)")
    out = Path(spec.output_dir)
    lock = OutputLock(out)
    lock.acquire()
    try:
        make_plan(spec)  # batch arithmetic errors (exit 2) before anything is written
        paths = write_run_dir(spec, out, cuda=cuda, bf16_supported=bf16_ok)
        ready_for_ranks(spec, cuda)
        from distsft.launch.after import check_tasks, eval_locally
        check_tasks(spec, out)  # eval.after_training: an unknown task is exit 2 before training
        print(f"distsft: run dir {out} ready in {time.perf_counter() - started:.1f} s; launching", flush=True)
        extra = launch_env(spec, cuda)
        if not cuda:
            extra["DS_ACCELERATOR"] = "cpu"  # say it, instead of DeepSpeed warning on every rank
        port = rendezvous_port(spec) if spec.distributed.gpus_per_node > 1 else None
        rc = launch(paths["run"], paths["accelerate"], out, extra, port)
        return eval_locally(spec, out, cuda) if rc == 0 and spec.eval.after_training else rc
    finally:
        lock.release()
