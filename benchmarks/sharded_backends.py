"""DDP vs DeepSpeed ZeRO-3 vs FSDP2 on the same run: per-rank memory, throughput, intermediate save time.

A randomly initialised Llama of ~57M parameters (hidden 768, 8 layers, the tiny model's tokenizer), full
fine-tuning in fp32 on 2 CPU ranks over gloo, `distsft run` with each backend, 8 optimizer steps, an
intermediate checkpoint after step 4. ZeRO-3 runs twice: as distsft saves now (partitioned state only)
and with HF's gathering intermediate save (DISTSFT_GATHER_INTERMEDIATE_SAVES=1, the behaviour before
distsft skipped it: a consolidated 16-bit state dict gathered layer by layer into rank 0 at every save).

* model-state memory per rank = the bytes of the tensors this rank holds for the model's weights, their
  gradients and the optimizer (benchmarks/state_probe.py: the ranks run `distsft.train.recipe.main` with one
  added callback that counts them before the optimizer step of step 3), max over the ranks;
* peak RSS per rank (VmHWM), and its rise after rank 0 prints "distsft: world size" (libraries loaded,
  process group up, no model yet): on CPU also allocator slack, activations and DeepSpeed's buffers;
* throughput = median real tokens/s of the logged steps 2-8 (a median: the machine is shared);
* save_seconds = distsft's own figure for the step-4 checkpoint (metrics.jsonl, slowest rank).

    python benchmarks/sharded_backends.py [--steps 8] [--layers 8] [--hidden 768]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

RUNS = {  # name -> (distributed section, extra environment)
    "ddp": ({"backend": "ddp"}, {}),
    "zero3": ({"backend": "deepspeed", "zero_stage": 3}, {}),
    "zero3 (gathering saves, before)": ({"backend": "deepspeed", "zero_stage": 3},
                                        {"DISTSFT_GATHER_INTERMEDIATE_SAVES": "1"}),
    "fsdp": ({"backend": "fsdp"}, {}),
}
BASELINE_LINE = "distsft: world size"
ENTRY = "state_probe"
# `distsft run`, its ranks started as `-m state_probe` (distsft.train.recipe.main plus the byte-counting callback)
LAUNCH = ("import sys, distsft.launcher as L; L.ENTRY_MODULE = 'state_probe'; from distsft.cli import main; "
          "sys.argv[0] = 'distsft'; main()")


def make_model(work: Path, hidden: int, layers: int) -> tuple[Path, int]:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    path = work / f"llama-h{hidden}-l{layers}"
    cfg = AutoConfig.from_pretrained(C.TINY)
    cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size = hidden, layers, hidden * 8 // 3
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = hidden // 64, hidden // 192, 64
    if not (path / "model.safetensors").exists():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.save_pretrained(path)
        for f in C.TINY.iterdir():
            if f.name.startswith(("tokenizer", "chat_template", "special_tokens")):
                shutil.copy(f, path / f.name)
    model = AutoModelForCausalLM.from_pretrained(path)
    return path, sum(p.numel() for p in model.parameters())


def _status_mb(pid: int, key: str) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_one(cmd: list[str], env: dict[str, str]) -> dict:
    """Per-rank VmHWM at the baseline line and at the end (polled every 0.1 s)."""
    import psutil
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True, cwd=str(C.ROOT))
    peak: dict[int, float] = {}
    base: dict[int, float] = {}
    stop = threading.Event()

    def ranks() -> list:
        try:
            return [p for p in psutil.Process(proc.pid).children(recursive=True) if C._is_rank(p, ENTRY)]
        except psutil.Error:
            return []

    def poll() -> None:
        while not stop.is_set():
            for p in ranks():
                hwm = _status_mb(p.pid, "VmHWM")
                if hwm is not None:
                    peak[p.pid] = max(hwm, peak.get(p.pid, 0.0))
            stop.wait(0.1)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    text = []
    assert proc.stdout is not None
    for line in proc.stdout:
        text.append(line)
        if BASELINE_LINE in line and not base:
            for p in ranks():
                hwm = _status_mb(p.pid, "VmHWM")
                if hwm is not None:
                    base[p.pid] = hwm
    rc = proc.wait()
    stop.set()
    t.join()
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({rc}):\n{''.join(text)[-4000:]}")
    # two ranks may print on one line: find each record
    states = [json.loads(m) for m in re.findall(r"STATE_BYTES (\{[^}]*\})", "".join(text))]
    return {"peak": peak, "base": base, "states": states}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--work", type=Path, default=C.DEFAULT_WORK / "sharded")
    ap.add_argument("--only", nargs="*", default=None, help="run only these (ddp, zero3, zero3-before, fsdp)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    model, n_params = make_model(a.work, a.hidden, a.layers)
    data = C.make_data(C.DEFAULT_WORK, 2000)
    res = {}
    for name, (dist, extra_env) in RUNS.items():
        short = name.split()[0] + ("-before" if extra_env else "")
        if a.only and short not in a.only:
            continue
        print(f"{name} ...", file=sys.stderr, flush=True)
        out = C.fresh(a.work / name.split()[0] / ("before" if extra_env else "after"))
        spec = C.write_spec(a.work / f"{name.split()[0]}.yaml", data=data, output_dir=out, max_steps=a.steps,
                            save_steps=a.steps // 2, max_length=256, per_device=2, global_batch=8,
                            extra={"model": {"name_or_path": str(model)},
                                   "distributed": dist, "slurm": {"signal_delay_s": 120}})
        env = C.bench_env(DISTSFT_CACHE_DIR=str(a.work / "cache"), **extra_env)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(C.BENCH), env.get("PYTHONPATH")) if x)
        t0 = time.time()
        mem = run_one([sys.executable, "-c", LAUNCH, "run", str(spec), "--gpus", str(C.WORLD)], env)
        metrics = C.read_jsonl(out / "metrics.jsonl")
        steps = [m for m in metrics if "loss" in m and m["step"] > 1 and m["step"] != a.steps // 2 + 1]
        saves = [m["save_seconds"] for m in metrics if "save_seconds" in m and m["step"] == a.steps // 2]
        rise = [mem["peak"][p] - mem["base"].get(p, float("nan")) for p in mem["peak"]]
        res[name] = {"peak": sorted(mem["peak"].values(), reverse=True), "rise": max(rise),
                     "states": max(x["total"] for x in mem["states"]) / 2**20,
                     "tok_s": statistics.median(m["tokens"] / m["step_time"] for m in steps),
                     "save": saves[0] if saves else float("nan"), "wall": time.time() - t0,
                     "ckpt_mb": sum(f.stat().st_size for f in (out / f"checkpoint-{a.steps // 2}").rglob("*")
                                    if f.is_file()) / 2**20}
        print(f"  {res[name]}", file=sys.stderr, flush=True)

    ddp = res.get("ddp") or {"states": float("nan"), "rise": float("nan"), "tok_s": float("nan")}
    print(f"\n`{C.command_line()}`  ")
    print(f"{C.machine()}; {C.versions()}  ")
    print(f"Llama {n_params / 1e6:.1f}M parameters (hidden {a.hidden}, {a.layers} layers), full fine-tuning, fp32, "
          f"2 CPU ranks over gloo, max_length 256, global batch 8, {a.steps} steps, checkpoint at step "
          f"{a.steps // 2}\n")
    print("| backend | model-state memory per rank, MB (× DDP) | peak RSS per rank, MB | RSS rise after start, MB "
          f"(× DDP) | tokens/s (× DDP) | step-{a.steps // 2} save, s | checkpoint on disk, MB |")
    print("|---|---|---|---|---|---|---|")
    for name, r in res.items():
        print(f"| {name} | {r['states']:,.0f} ({r['states'] / ddp['states']:.2f}) | "
              f"{' / '.join(f'{x:,.0f}' for x in r['peak'])} | {r['rise']:,.0f} ({r['rise'] / ddp['rise']:.2f}) | "
              f"{r['tok_s']:,.0f} ({r['tok_s'] / ddp['tok_s']:.2f}) | {r['save']:.2f} | {r['ckpt_mb']:,.0f} |")


if __name__ == "__main__":
    main()
