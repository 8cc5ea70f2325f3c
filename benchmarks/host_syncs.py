"""Host syncs per optimizer step of a real `distsft run` (2 CPU ranks over gloo), by who asks for them.

    python benchmarks/host_syncs.py [--steps 12] [--accum 4] [--logging-steps 1]

Every rank runs with benchmarks/sync_probe on PYTHONPATH (its sitecustomize counts, per optimizer step,
each host read of a tensor value -- .item(), .tolist(), bool/int/float of a tensor -- and each blocking
collective, attributed to the innermost caller outside torch: distsft or a library). On a GPU every such
read waits for the device; here, on CPU tensors, the same calls are counted. Steps 2..N-1 are averaged
(step 1 includes set-up, the last one the final save); no eval, no checkpoints.

Target (issue 19 item 18): distsft's own <= 1 per optimizer step, the preemption agreement included.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--accum", type=int, default=4)
    ap.add_argument("--logging-steps", type=int, default=1)
    ap.add_argument("--work", type=Path, default=Path("/tmp/distsft-bench/host-syncs"))
    a = ap.parse_args()
    import common as C
    probe = C.fresh(a.work / "probe")
    out = C.fresh(a.work / "run")
    data = C.make_data(C.DEFAULT_WORK, 2_000)
    spec = C.write_spec(a.work / "spec.yaml", data=data, output_dir=out, max_steps=a.steps,
                        logging_steps=a.logging_steps, per_device=2, global_batch=2 * a.accum * C.WORLD)
    env = C.bench_env(DISTSFT_SYNC_PROBE=str(probe))
    env["PYTHONPATH"] = os.pathsep.join([str(C.BENCH / "sync_probe"), env.get("PYTHONPATH", "")])
    run = C.run_logged(C.distsft_cmd(spec), env=env, rank_pattern="distsft", timeout=900)
    C.check(run, "distsft run")
    per_rank = [json.loads(p.read_text()) for p in sorted(probe.glob("rank*.json"))]
    if not per_rank:
        sys.exit("no rank wrote its counts (is benchmarks/sync_probe on the ranks' PYTHONPATH?)")
    r0 = per_rank[0]
    steps = [str(s) for s in range(1, r0["steps"]) if str(s) in r0["counts"]]
    by_owner: dict[tuple[str, str], float] = collections.defaultdict(float)
    sites: dict[tuple[str, str, str], float] = collections.defaultdict(float)
    for s in steps:
        for owner, kind, site, n in r0["counts"][s]:
            by_owner[(owner, kind)] += n / len(steps)
            sites[(owner, kind, site)] += n / len(steps)
    print(f"\n`{C.command_line()}`  ")
    print(f"{C.machine()}; {C.versions()}; 2 CPU ranks (gloo); micro-batch 2, accumulation {a.accum}, "
          f"logging every {a.logging_steps} step(s); rank 0, mean over optimizer steps 2..{r0['steps'] - 1}\n")
    print("| who | host reads / step | blocking collectives / step | async collectives / step | total waits / step |")
    print("|---|---|---|---|---|")
    owners = sorted({o for o, _ in by_owner}, key=lambda o: (o != "distsft", o))
    for o in owners:
        reads, coll, asy = (by_owner.get((o, k), 0.0) for k in ("read", "collective", "async"))
        print(f"| {o} | {reads:.2f} | {coll:.2f} | {asy:.2f} | {reads + coll:.2f} |")
    print("\ndistsft's call sites (per step):")
    for (o, kind, site), n in sorted(sites.items(), key=lambda kv: -kv[1]):
        if o == "distsft":
            print(f"  {n:5.2f}  {kind:10s} {site}")
    print("\nlibrary call sites (per step, top 12):")
    for (o, kind, site), n in sorted(((k, v) for k, v in sites.items() if k[0] != "distsft"), key=lambda kv: -kv[1])[:12]:
        print(f"  {n:5.2f}  {kind:10s} {o}: {site}")


if __name__ == "__main__":
    main()
