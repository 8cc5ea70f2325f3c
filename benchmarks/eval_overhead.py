"""`distsft eval` time against calling lm-evaluation-harness directly (issue 22; target ratio <= 1.1).

On the quickstart model (examples/quickstart.yaml, trained here once into the work directory unless
--run names a run) with the local task examples/eval_tasks/tiny_arith, both as whole commands (process
start, imports, task index, model load, scoring, writing results), alternating A/B for --repeats rounds:

    A: distsft eval RUN --tasks tiny_arith eval.include_path=examples/eval_tasks
    B: lm_eval --model hf --model_args pretrained=RUN,dtype=auto --tasks tiny_arith
         --include_path examples/eval_tasks --apply_chat_template --fewshot_as_multiturn
         --device cpu --batch_size 8 --output_path WORK/direct

Same settings on both sides (chat template on, batch 8, lm-eval's default bootstrap); distsft also
writes metrics.jsonl/TensorBoard. Prints the median of each and the ratio.

    python benchmarks/eval_overhead.py [--run RUN_DIR] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TASKS = ROOT / "examples" / "eval_tasks"


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path("/tmp/distsft-bench/eval"))
    a = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), PYTHONUNBUFFERED="1")
    run = a.run or a.work / "quickstart"
    if not (run / "model.safetensors").is_file():
        subprocess.run([sys.executable, "-m", "distsft.cli", "run", "examples/quickstart.yaml", "--gpus", "2",
                        f"output_dir={run}"], check=True, cwd=ROOT, env=env)
    a_cmd = [sys.executable, "-m", "distsft.cli", "eval", str(run), "--tasks", "tiny_arith",
             f"eval.include_path={TASKS}"]
    b_cmd = [str(BIN / "lm_eval"), "--model", "hf", "--model_args", f"pretrained={run},dtype=auto",
             "--tasks", "tiny_arith", "--include_path", str(TASKS), "--apply_chat_template",
             "--fewshot_as_multiturn", "--device", "cpu", "--batch_size", "8", "--output_path", str(a.work / "direct")]
    ta, tb = [], []
    for i in range(a.repeats):
        ta.append(timed(a_cmd, env))
        tb.append(timed(b_cmd, env))
        print(f"round {i + 1}: distsft eval {ta[-1]:.1f} s, lm_eval {tb[-1]:.1f} s", flush=True)
    ma, mb = statistics.median(ta), statistics.median(tb)
    print("\n| command | median wall s | runs |\n|---|---:|---|")
    print(f"| distsft eval | {ma:.1f} | {', '.join(f'{x:.1f}' for x in ta)} |")
    print(f"| lm_eval (direct) | {mb:.1f} | {', '.join(f'{x:.1f}' for x in tb)} |")
    print(f"\nratio distsft / lm_eval: {ma / mb:.2f} (target <= 1.1)")
    print(f"command: python benchmarks/eval_overhead.py --run {run} --repeats {a.repeats}")


if __name__ == "__main__":
    main()
