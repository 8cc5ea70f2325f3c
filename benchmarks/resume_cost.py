"""Resume cost: wall time from `distsft run` to the first resumed optimizer step, resuming early (1%) vs
late (90%) in one long epoch (200,000 synthetic chats, about a thousand steps of 16 packed rows).

distsft's data position is a pure function of the step (sampler.GlobalOrder; HF's batch skipping is off,
ignore_data_skip=True), so restoring it should cost the same at any step. What is measured:

  1. setup (not timed): one `distsft run` of 1 step with save_steps=1 writes a complete checkpoint-1
     (and the packed data cache, so the timed runs find it warm);
  2. for K in {1% , 90%} of the epoch's steps: a fresh output dir gets a copy of checkpoint-1 renamed
     checkpoint-K, with trainer_state.json global_step = K and distsft_complete.json step = K (the
     weights/optimizer/RNG files are step 1's: it is the restoring of the *position* that is measured,
     the part that grows with the position under HF's default replay), then `distsft run` (resume:
     auto) is timed until its "step K+1/" line; the process tree is killed there.
  Runs alternate early / late / early / late.

For contrast, HF's default (ignore_data_skip=False) on an *iterable* dataset replays the skipped
batches: accelerate's `skip_first_batches` iterates and collates every one of them. That is measured
in this process, on the same packed cache, for one rank's share (K x accumulation micro-batches of 4
rows, distsft's collator): time to the first batch after the skip. (On a map-style dataset HF skips
sampler indices without loading them, which is cheap; streaming data is where replay costs.)

    python benchmarks/resume_cost.py [--n 200000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def setup(work: Path, data: Path, env: dict) -> tuple[Path, int]:
    out = C.fresh(work / "setup")
    spec = C.write_spec(work / "setup.yaml", data=data, output_dir=out, max_steps=1, logging_steps=1, save_steps=1)
    run = C.run_logged(C.distsft_cmd(spec), env=env, rank_pattern="distsft.train")
    C.check(run, "distsft setup run")
    m = re.search(r"(\d+) steps/epoch", run.text())
    ckpt = out / "checkpoint-1"
    if not (ckpt / "distsft_complete.json").exists() or not m:
        raise RuntimeError("setup run left no complete checkpoint-1:\n" + run.text()[-3000:])
    return ckpt, int(m.group(1))


def plant(ckpt: Path, out: Path, k: int, global_batch: int) -> None:
    dst = out / f"checkpoint-{k}"
    shutil.copytree(ckpt, dst)
    state = json.loads((dst / "trainer_state.json").read_text())
    state["global_step"] = k
    (dst / "trainer_state.json").write_text(json.dumps(state, indent=1))
    marker = json.loads((dst / "distsft_complete.json").read_text())
    marker.update(step=k, rows_consumed=k * global_batch)
    (dst / "distsft_complete.json").write_text(json.dumps(marker, indent=1))


def timed_resume(work: Path, data: Path, env: dict, ckpt: Path, k: int, i: int) -> dict:
    out = C.fresh(work / f"resume-{k}-{i}")
    plant(ckpt, out, k, C.GLOBAL_BATCH)
    spec = C.write_spec(work / f"resume-{k}-{i}.yaml", data=data, output_dir=out, max_steps=-1, logging_steps=1,
                        save_steps=100_000, resume="auto")
    pat = rf"^step {k + 1}/"
    run = C.run_logged(C.distsft_cmd(spec), env=env, rank_pattern="distsft.train", stop_on=pat)
    first = run.first(pat)
    if first is None or "resuming from checkpoint-" not in run.text():
        raise RuntimeError(f"resume at {k} did not reach step {k + 1}:\n{run.text()[-3000:]}")
    return {"s": first, "cpu": run.tree_cpu}


def hf_replay(cache_root: Path, skips: list[int]) -> dict[int, float]:
    """Seconds to the first batch after accelerate's skip_first_batches(k) on an iterable dataset."""
    from accelerate import skip_first_batches
    from datasets import load_from_disk
    from torch.utils.data import DataLoader
    from distsft.data.collate import PackedCollator
    path = next(p for p in cache_root.glob("train-*") if (p / "stats.json").exists())
    ds = load_from_disk(str(path)).to_iterable_dataset()
    out = {}
    for k in skips:
        dl = DataLoader(ds, batch_size=C.PER_DEVICE, collate_fn=PackedCollator(0, "sdpa"))
        t0 = time.perf_counter()
        next(iter(skip_first_batches(dl, k)))
        out[k] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--early", type=float, default=0.01)
    ap.add_argument("--late", type=float, default=0.90)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--no-replay", action="store_true", help="skip the HF replay contrast")
    ap.add_argument("--work", type=Path, default=C.DEFAULT_WORK / "resume")
    a = ap.parse_args()
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    data = C.make_data(C.DEFAULT_WORK, a.n)
    cache = work / "distsft-cache"
    env = C.bench_env(DISTSFT_CACHE_DIR=str(cache))
    print("setup: one step with a checkpoint (tokenizes the data into the cache) ...", file=sys.stderr, flush=True)
    ckpt, per_epoch = setup(work, data, env)
    ks = [max(1, round(a.early * per_epoch)), round(a.late * per_epoch)]
    res: dict[int, list[dict]] = {k: [] for k in ks}
    for i in range(a.repeat):
        for k in ks:
            print(f"run {i + 1}/{a.repeat}: resume at step {k} ...", file=sys.stderr, flush=True)
            r = timed_resume(work, data, env, ckpt, k, i)
            res[k].append(r)
            print(f"  first resumed step after {r['s']:.2f} s", file=sys.stderr, flush=True)
    replay = {} if a.no_replay else hf_replay(cache, [k * C.ACCUM for k in ks])

    print(f"\n`{C.command_line()}`  ")
    print(f"{C.machine()}; {C.versions()}  ")
    print(f"{a.n:,} chats → {per_epoch:,} steps/epoch (global batch {C.GLOBAL_BATCH}, max_length {C.MAX_LENGTH}), "
          "2 CPU ranks, data cache warm; checkpoint-1 planted as checkpoint-K\n")
    print("| resume at | step | command → first resumed step, s (each run) | median s | CPU s of the tree (median) |")
    print("|---|---|---|---|---|")
    for k, frac in zip(ks, (a.early, a.late)):
        each = ", ".join(f"{r['s']:.2f}" for r in res[k])
        print(f"| {frac:.0%} | {k:,} | {each} | {statistics.median(r['s'] for r in res[k]):.2f} | "
              f"{statistics.median(r['cpu'] for r in res[k]):.1f} |")
    lo, hi = res[ks[0]], res[ks[1]]
    pairs = [h["s"] / l["s"] for l, h in zip(lo, hi)]
    cpu = [h["cpu"] / l["cpu"] for l, h in zip(lo, hi)]
    print(f"\nlate / early: {', '.join(f'{p:.3f}' for p in pairs)} per pair (wall), median {statistics.median(pairs):.3f}; "
          f"CPU {statistics.median(cpu):.3f}")
    if replay:
        print("\nHF default replay on an iterable dataset (accelerate.skip_first_batches, one rank's share):\n")
        print("| resume at | micro-batches replayed per rank | s to the first batch |")
        print("|---|---|---|")
        for k, frac in zip(ks, (a.early, a.late)):
            print(f"| {frac:.0%} (step {k:,}) | {k * C.ACCUM:,} | {replay[k * C.ACCUM]:.2f} |")
        print(f"\nreplay late / early: {replay[ks[1] * C.ACCUM] / replay[ks[0] * C.ACCUM]:.1f}x")


if __name__ == "__main__":
    main()
