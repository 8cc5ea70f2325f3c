"""Launch overhead: wall time from the command to the end of the first optimizer step,
`distsft run` vs `accelerate launch benchmarks/plain_trl.py` (2 CPU ranks each), data cache cold and warm.

  distsft: `distsft run SPEC --gpus 2`: renders the run dir, tokenizes+packs the data once in the
           launcher (cold) or finds it in $DISTSFT_CACHE_DIR (warm), then `accelerate launch`es the
           ranks, which memory-map it. First step = the moment its "step 1/N" line (logging_steps=1)
           reaches this harness.
  TRL:     `accelerate launch --multi_gpu --num_processes 2 benchmarks/plain_trl.py`: every rank loads
           the JSON and runs SFTTrainer's tokenize/label/pack maps itself. Cold = empty HF_DATASETS_CACHE;
           warm = the second start with the same cache (load_dataset and the maps may reuse their cached
           Arrow files). First step = the moment its "PLAIN_TRL first_step" line (printed by an on_step_end
           callback at step 1) reaches this harness.

Cold means an empty data cache, not a cold machine: Python packages are in the OS page cache for
both sides. The run order alternates distsft-cold, TRL-cold, distsft-warm, TRL-warm, repeated; each
process tree is killed as soon as its first step is seen. Also reported: the CPU seconds the whole
process tree had used by then (nearly blind to other users' load on a shared machine) and where the
time went (distsft: launcher until "launching"; TRL: rank 0's imports / model+data load / SFTTrainer
init incl. dataset preparation / until step 1).

    python benchmarks/launch_overhead.py [--n 20000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402

DISTSFT_FIRST = r"^step 1/"
TRL_FIRST = r"^PLAIN_TRL first_step "


def one(side: str, cache: str, work: Path, data: Path, i: int, src: Path | None = None) -> dict:
    caches = work / f"caches-{side}-{i}"  # per side: a cold TRL run must not empty distsft's cache
    if cache == "cold":
        C.fresh(caches)
    env = C.bench_env(DISTSFT_CACHE_DIR=str(caches / "distsft"), HF_DATASETS_CACHE=str(caches / "hf"))
    if src and side == "distsft":
        env["PYTHONPATH"] = f"{src.resolve()}:{env.get('PYTHONPATH', '')}"
    out = C.fresh(work / f"lo-{side}-{cache}-{i}")
    if side == "distsft":
        spec = C.write_spec(work / f"lo-{i}.yaml", data=data, output_dir=out, max_steps=3, logging_steps=1)
        run = C.run_logged(C.distsft_cmd(spec), env=env, rank_pattern="distsft.train", stop_on=DISTSFT_FIRST)
        first = run.first(DISTSFT_FIRST)
        ready = run.first(r"^distsft: run dir .* ready in")
        m = next((re.search(r"ready in ([\d.]+) s", l) for _, l in run.lines if "ready in" in l), None)
        phases = {"launcher until launching": ready, "launcher's own prep (its clock)": float(m.group(1)) if m else None,
                  "ranks until step 1": (first - ready) if first is not None and ready is not None else None}
    else:
        cmd = C.plain_trl_cmd(data=data, output_dir=out, max_steps=3, result=out / "result.json")
        run = C.run_logged(cmd, env=env, rank_pattern="plain_trl.py", stop_on=TRL_FIRST)
        first = run.first(TRL_FIRST)
        line = next((l for _, l in run.lines if re.search(TRL_FIRST, l)), None)
        phases = {}
        if line:
            p = json.loads(line.split(" ", 3)[3])
            phases = {"launcher+torchrun until rank start": p["proc_start"] - run.t0,
                      "rank 0 imports": p["imports_s"], "model + load_dataset": p["load_s"],
                      "SFTTrainer init (dataset prep)": p["prepare_dataset_s"],
                      "until step 1": p["until_first_step_s"]}
    if first is None:
        raise RuntimeError(f"{side} ({cache}) never reached step 1:\n{run.text()[-4000:]}")
    return {"first_step_s": first, "tree_cpu_s": run.tree_cpu, "phases": phases}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="training examples (synthetic chats)")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--work", type=Path, default=C.DEFAULT_WORK / "launch")
    ap.add_argument("--distsft-src", type=Path, default=None,
                    help="run distsft from this directory's copy of the package (PYTHONPATH), e.g. a prototype fix")
    a = ap.parse_args()
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    data = C.make_data(C.DEFAULT_WORK, a.n)

    res: dict[tuple[str, str], list[dict]] = {}
    for i in range(a.repeat):
        for cache in ("cold", "warm"):
            for side in ("distsft", "TRL"):
                print(f"run {i + 1}/{a.repeat}: {side} {cache} ...", file=sys.stderr, flush=True)
                r = one(side, cache, work, data, i, a.distsft_src)
                res.setdefault((side, cache), []).append(r)
                print(f"  first step after {r['first_step_s']:.2f} s (tree CPU {r['tree_cpu_s']:.1f} s)",
                      file=sys.stderr, flush=True)

    print(f"\n`{C.command_line()}`  ")
    print(f"{C.machine()}; {C.versions()}  ")
    print(f"{a.n:,} chats, max_length {C.MAX_LENGTH}, global batch {C.GLOBAL_BATCH}, 2 CPU ranks; order per repeat: "
          "distsft cold, TRL cold, distsft warm, TRL warm"
          + (f"; distsft from {a.distsft_src}" if a.distsft_src else "") + "\n")
    print("| cache | side | to first step, s (each run) | median s | CPU s of the process tree (median) | where the time went (median s) |")
    print("|---|---|---|---|---|---|")
    med = {}
    for cache in ("cold", "warm"):
        for side in ("distsft", "TRL"):
            rs = res[(side, cache)]
            m = statistics.median(r["first_step_s"] for r in rs)
            cpu = statistics.median(r["tree_cpu_s"] for r in rs)
            med[(side, cache)] = (m, cpu)
            keys = rs[0]["phases"].keys()
            ph = "; ".join(f"{k} {statistics.median(r['phases'][k] for r in rs if r['phases'].get(k) is not None):.1f}"
                           for k in keys if any(r["phases"].get(k) is not None for r in rs))
            each = ", ".join(f"{r['first_step_s']:.2f}" for r in rs)
            print(f"| {cache} | {side} | {each} | {m:.2f} | {cpu:.1f} | {ph} |")
    print("\n| cache | distsft − TRL, s (median of same-repeat pairs) | distsft / TRL (median of pairs) | CPU distsft / TRL |")
    print("|---|---|---|---|")
    for cache in ("cold", "warm"):
        d, t = res[("distsft", cache)], res[("TRL", cache)]
        diff = statistics.median(x["first_step_s"] - y["first_step_s"] for x, y in zip(d, t))
        ratio = statistics.median(x["first_step_s"] / y["first_step_s"] for x, y in zip(d, t))
        cpu = statistics.median(x["tree_cpu_s"] / y["tree_cpu_s"] for x, y in zip(d, t))
        print(f"| {cache} | {diff:+.2f} | {ratio:.3f} | {cpu:.3f} |")


if __name__ == "__main__":
    main()
