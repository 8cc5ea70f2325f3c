"""`distsft plan`'s time estimate against a measured run on this machine (issue 23), assumed and measured.

1. The peak: one rank's fp32 matmul FLOP/s on this CPU (torch.mm of 1024 x 1024 matrices, the thread
   count a rank gets), passed as `logging.peak_tflops` so the *assumed* estimate (35% MFU of the peak)
   is about this machine rather than an H100.
2. `plan --json` without any measurement: the assumed estimate.
3. `distsft sanity` (15 steps on a subset), which records its measured tokens/s per rank in the output
   directory; `plan --json` again: the measured estimate.
4. `distsft run` on the same spec; the training time is the sum of the logged step times (what the
   estimate predicts: start-up, data preparation and the final save are not in it).

Error = (estimate - measured) / measured. 2 CPU ranks over gloo, the tiny Llama, the quickstart's data.

    python benchmarks/time_estimate.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DISTSFT = [sys.executable, "-m", "distsft.cli"]


def cpu_peak_tflops(threads: int) -> float:
    import torch
    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(10):
            a @ b
        best = max(best, 10 * 2 * 1024**3 / (time.perf_counter() - t))
    return best / 1e12


def sh(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([*DISTSFT, *args], capture_output=True, text=True, cwd=ROOT, timeout=3600,
                       env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if p.returncode != 0:
        sys.exit(f"distsft {' '.join(args)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distsft-time-"))
    world = 2
    threads = max(1, (os.cpu_count() or 2) // world)
    peak = cpu_peak_tflops(threads)
    spec = work / "spec.yaml"
    spec.write_text(f"""
model: {{name_or_path: {ROOT / 'examples' / 'tiny-llama'}}}
data: {{train_files: [{ROOT / 'examples' / 'data' / 'train.jsonl'}], max_length: 512}}
train: {{per_device_train_batch_size: 4, global_batch_size: 16, learning_rate: 3.0e-3, max_steps: {a.steps},
        bf16: false, warmup_ratio: 0.05}}
distributed: {{gpus_per_node: {world}}}
logging: {{logging_steps: 5, peak_tflops: {peak:.6f}}}
checkpoint: {{save_steps: 100000}}
output_dir: {work / 'out'}
""")
    assumed = json.loads(sh("plan", str(spec), "--json").stdout)["estimate"]
    sh("sanity", str(spec))
    measured = json.loads(sh("plan", str(spec), "--json").stdout)["estimate"]
    sh("run", str(spec))
    metrics = [json.loads(x) for x in (work / "out" / "metrics.jsonl").read_text().splitlines() if x.strip()]
    train = [m for m in metrics if m.get("step_time")]
    steps_in = [m["step"] - prev for m, prev in zip(train, [0] + [t["step"] for t in train])]
    actual_h = sum(m["step_time"] * n for m, n in zip(train, steps_in)) / 3600
    print(f"\nCPU peak per rank: {peak * 1e3:.1f} GFLOP/s fp32 ({threads} thread(s)); {world} ranks; "
          f"{a.steps} steps of 16 x 512 tokens\n")
    print("| estimate | tokens/s per rank | predicted training time | measured | error |")
    print("|---|---|---|---|---|")
    for name, e in (("assumed (35% MFU of the CPU peak)", assumed), ("measured (by sanity)", measured)):
        print(f"| {name} | {e['tokens_per_second_per_gpu']:,.0f} | {e['hours'] * 3600:.1f} s | "
              f"{actual_h * 3600:.1f} s | {(e['hours'] - actual_h) / actual_h:+.0%} |")
    print(f"\nbasis: assumed = {assumed['basis']}; measured = {measured['basis']}")


if __name__ == "__main__":
    main()
