"""Peak resident memory per rank with N and 10 x N training examples: distsft (the ranks memory-map the
packed Arrow cache the launcher wrote) vs plain TRL (benchmarks/plain_trl.py: every rank tokenizes and
packs the data itself, through `datasets` maps).

Each run: 2 CPU ranks, the tiny model, max_length 512, global batch 16, a few optimizer steps, data cache
cold (so the launcher's tokenization shows in its own peak, not in the ranks'). Peak RSS = VmHWM of each
rank process (/proc/PID/status, polled every 0.25 s; VmHWM is the process' high-water mark, so the
last poll before exit holds its peak). distsft's own `peak_memory_gb` (max over ranks of ru_maxrss,
logged in metrics.jsonl) is shown as a cross-check. Order: distsft N, TRL N, distsft 10N, TRL 10N.

    python benchmarks/memory_scaling.py [--n 5000] [--factor 10] [--no-trl]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def run_distsft(work: Path, data: Path, n: int, steps: int) -> dict:
    caches = C.fresh(work / f"cache-distsft-{n}")
    out = C.fresh(work / f"mem-distsft-{n}")
    spec = C.write_spec(work / f"mem-{n}.yaml", data=data, output_dir=out, max_steps=steps, logging_steps=1)
    run = C.run_logged(C.distsft_cmd(spec), env=C.bench_env(DISTSFT_CACHE_DIR=str(caches)),
                       rank_pattern="distsft.train")
    C.check(run, "distsft run")
    m = re.search(r"data: (\d+) examples, (\d+) tokens in (\d+) rows", run.text())
    logged = [r["peak_memory_gb"] for r in C.read_jsonl(out / "metrics.jsonl") if "peak_memory_gb" in r]
    return {"ranks": sorted(run.rank_hwm_mb.values(), reverse=True), "launcher": run.root_hwm_mb,
            "rows": int(m.group(3)) if m else None, "logged_mb": max(logged) * 1024 if logged else None}


def run_trl(work: Path, data: Path, n: int, steps: int) -> dict:
    caches = C.fresh(work / f"cache-trl-{n}")
    out = C.fresh(work / f"mem-trl-{n}")
    cmd = C.plain_trl_cmd(data=data, output_dir=out, max_steps=steps, result=out / "result.json")
    run = C.run_logged(cmd, env=C.bench_env(HF_DATASETS_CACHE=str(caches)), rank_pattern="plain_trl.py")
    C.check(run, "plain TRL")
    res = C.plain_result(run)
    return {"ranks": sorted(run.rank_hwm_mb.values(), reverse=True), "launcher": run.root_hwm_mb,
            "rows": res["num_rows"], "logged_mb": max(res["peak_rss_mb"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5_000)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--no-trl", action="store_true", help="distsft only")
    ap.add_argument("--work", type=Path, default=C.DEFAULT_WORK / "memory")
    a = ap.parse_args()
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    sizes = [a.n, a.n * a.factor]
    data = {n: C.make_data(C.DEFAULT_WORK, n) for n in sizes}
    sides = ["distsft"] + ([] if a.no_trl else ["TRL"])
    res: dict[tuple[str, int], dict] = {}
    for n in sizes:
        for side in sides:
            print(f"{side} {n:,} examples ...", file=sys.stderr, flush=True)
            res[(side, n)] = (run_distsft if side == "distsft" else run_trl)(work, data[n], n, a.steps)
            print(f"  ranks {res[(side, n)]['ranks']}", file=sys.stderr, flush=True)

    print(f"\n`{C.command_line()}`  ")
    print(f"{C.machine()}; {C.versions()}  ")
    print(f"2 CPU ranks, tiny model, max_length {C.MAX_LENGTH}, global batch {C.GLOBAL_BATCH}, {a.steps} steps, "
          "data cache cold\n")
    print("| side | examples | packed rows | peak RSS per rank, MB (VmHWM) | in-process peak, MB | "
          "launcher process peak, MB |")
    print("|---|---|---|---|---|---|")
    for side in sides:
        for n in sizes:
            r = res[(side, n)]
            ranks = " / ".join(f"{x:,.0f}" for x in r["ranks"])
            logged = f"{r['logged_mb']:,.0f}" if r["logged_mb"] else "-"
            print(f"| {side} | {n:,} | {r['rows']:,} | {ranks} | {logged} | {r['launcher']:,.0f} |")
    print(f"\n| side | rank peak at {a.factor}×N / at N (max over ranks) | launcher peak at {a.factor}×N / at N |")
    print("|---|---|---|")
    for side in sides:
        lo, hi = res[(side, sizes[0])], res[(side, sizes[1])]
        print(f"| {side} | {max(hi['ranks']) / max(lo['ranks']):.3f} | {hi['launcher'] / lo['launcher']:.3f} |")


if __name__ == "__main__":
    main()
