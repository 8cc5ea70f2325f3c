"""Training throughput: `distsft run` vs the plain TRL script (benchmarks/plain_trl.py), same machine.

Same tiny Llama (examples/tiny-llama, sdpa, fp32), same data (N synthetic chats from make_tiny's
generator), same max_length (512), same global batch (16 = 4 per rank x 2 accumulation x 2 CPU ranks),
same optimizer settings, logging every step on both sides, no checkpoints. The runs alternate
distsft / TRL / distsft / TRL ... (the machine is shared: compare figures of the same run only).

Measured over the steady state, steps 2..N (step 1 is excluded):
  distsft: OUTPUT_DIR/metrics.jsonl (logging_steps=1): sum of `tokens` (global real tokens of the step)
           over sum of `step_time` (log-to-log time)
  TRL:     plain_trl.py's step-end timestamps and the real tokens its collator saw (see its docstring)
Real tokens = tokens of the examples, padding excluded, on both sides. The packings differ (distsft BFD
over the whole set; TRL BFD per 1,000-row map batch), so tokens/step differ slightly: real tokens/s is
the figure of merit; steps/s is shown too. Peak RSS per rank is VmHWM polled from /proc.

    python benchmarks/throughput_vs_trl.py [--n 20000] [--steps 25] [--repeat 2]

--distsft-src DIR runs distsft from another copy of the package (PYTHONPATH=DIR), to measure a
prototype fix without touching src/; --vs-src DIR compares the installed distsft against such a copy
instead of TRL; --trl-gc / --distsft-gc pin activation checkpointing on a side; --layout-micro runs only
the in-process forward+backward comparison of the two sides' batch layouts (see layout_micro).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common as C  # noqa: E402


def run_distsft(work: Path, data: Path, steps: int, i: int, env: dict, gc: bool) -> dict:
    out = C.fresh(work / f"tp-distsft-{i}")
    spec = C.write_spec(work / f"tp-distsft-{i}.yaml", data=data, output_dir=out, max_steps=steps,
                        logging_steps=1, gradient_checkpointing=gc)
    run = C.run_logged(C.distsft_cmd(spec), env=env, rank_pattern="distsft.train",
                       marks={"first": r"^step 1/", "last": r"^step \d+/"})
    C.check(run, "distsft run")
    res = C.distsft_steady(C.read_jsonl(out / "metrics.jsonl"))
    res["cpu_per_step"] = run.cpu_between("first", "last") / res["steps"]
    res["peak_rss_mb"] = sorted(run.rank_hwm_mb.values(), reverse=True)
    res["wall"] = run.wall
    return res


def run_trl(work: Path, data: Path, steps: int, i: int, env: dict, gc: str) -> dict:
    out = C.fresh(work / f"tp-trl-{i}")
    cmd = C.plain_trl_cmd(data=data, output_dir=out, max_steps=steps, result=out / "result.json",
                          gradient_checkpointing=gc)
    run = C.run_logged(cmd, env=env, rank_pattern="plain_trl.py",
                       marks={"first": r"^PLAIN_TRL step 1$", "last": r"^PLAIN_TRL step \d+$"})
    C.check(run, "plain TRL")
    res = C.plain_result(run)
    res.update(C.steady(res["step_tokens"][1:], res["step_times"]))
    res["cpu_per_step"] = run.cpu_between("first", "last") / res["steps"]
    res["peak_rss_mb"] = sorted(run.rank_hwm_mb.values(), reverse=True) or res["peak_rss_mb"]
    res["wall"] = run.wall
    return res


def layout_micro(reps: int = 5, rounds: int = 3) -> None:
    """Why the sides differ on CPU/sdpa: one rank's forward+backward of the same 4 packed rows of 512
    tokens, as distsft's PackedCollator lays them out ([4, 512] + a per-row block-diagonal 4D mask) and
    as TRL's padding-free collator does ([1, 2048] with position_ids; transformers builds a 2048 x 2048
    block mask for sdpa, so attention costs (4 x 512)^2 instead of 4 x 512^2). 1 thread, alternating."""
    import numpy as np
    import time
    import torch
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from distsft.data.collate import PackedCollator
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(C.TINY, dtype=torch.float32, attn_implementation="sdpa").train()
    rng = np.random.default_rng(0)

    def rows():
        out = []
        for _ in range(C.PER_DEVICE):
            lens = []
            while sum(lens) < C.MAX_LENGTH - 40:
                lens.append(int(rng.integers(20, 70)))
            lens[-1] -= sum(lens) - C.MAX_LENGTH
            ids = rng.integers(5, 500, size=C.MAX_LENGTH).tolist()
            out.append({"input_ids": ids, "labels": ids, "seq_lengths": lens})
        return out

    def step(batch):
        batch = {k: v for k, v in batch.items() if k != "seq_idx"}
        model(**batch).loss.backward()

    sides = {"distsft [4, 512] + 4D mask": PackedCollator(0, "sdpa"),
             "TRL padding-free [1, 2048]": DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)}
    ms: dict[str, list[float]] = {k: [] for k in sides}
    for _ in range(rounds):
        for name, col in sides.items():
            step(col(rows()))
            t0 = time.perf_counter()
            for _ in range(reps):
                step(col(rows()))
            ms[name].append((time.perf_counter() - t0) / reps * 1000)
    print(f"\n`{C.command_line()}`  \n{C.machine()}; {C.versions()}\n")
    print("| layout of one micro-batch (4 rows x 512 tokens, tiny Llama, sdpa, fp32, 1 thread) | forward+backward ms (each round) | median |")
    print("|---|---|---|")
    for name, v in ms.items():
        print(f"| {name} | {', '.join(f'{x:.0f}' for x in v)} | {sorted(v)[len(v) // 2]:.0f} |")
    a, b = (sorted(v)[len(v) // 2] for v in ms.values())
    print(f"\nTRL / distsft time per micro-batch: {b / a:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=20_000, help="training examples (synthetic chats)")
    ap.add_argument("--steps", type=int, default=25, help="optimizer steps per run (step 1 excluded)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per side, alternating")
    ap.add_argument("--work", type=Path, default=C.DEFAULT_WORK / "throughput")
    ap.add_argument("--distsft-src", type=Path, default=None,
                    help="directory holding a (patched) distsft package to run instead of the installed one")
    ap.add_argument("--vs-src", type=Path, default=None,
                    help="compare the installed distsft against the copy in this directory (instead of TRL)")
    ap.add_argument("--distsft-gc", action="store_true",
                    help="spec train.gradient_checkpointing: true (default: false, the spec default)")
    ap.add_argument("--trl-gc", choices=["default", "on", "off"], default="default",
                    help="plain TRL's activation checkpointing (default: SFTConfig's default, on)")
    ap.add_argument("--layout-micro", action="store_true",
                    help="only the in-process micro-benchmark of the two batch layouts (see layout_micro)")
    a = ap.parse_args()
    if a.layout_micro:
        return layout_micro()

    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    data = C.make_data(C.DEFAULT_WORK, a.n)
    env = C.bench_env(DISTSFT_CACHE_DIR=str(work / "distsft-cache"), HF_DATASETS_CACHE=str(work / "hf-cache"))
    dist_env = dict(env)
    if a.distsft_src:
        dist_env["PYTHONPATH"] = f"{a.distsft_src.resolve()}:{env.get('PYTHONPATH', '')}"

    peer = "TRL"
    if a.vs_src:
        peer = f"distsft ({a.vs_src})"
        peer_env = dict(env, PYTHONPATH=f"{a.vs_src.resolve()}:{env.get('PYTHONPATH', '')}")
    rows: list[tuple[str, int, dict]] = []
    for i in range(a.repeat):
        for side in ("distsft", peer):
            print(f"run {i + 1}/{a.repeat}: {side} ...", file=sys.stderr, flush=True)
            if side == "distsft":
                res = run_distsft(work, data, a.steps, i, dist_env, a.distsft_gc)
            elif a.vs_src:
                res = run_distsft(work, data, a.steps, i + 1000, peer_env, a.distsft_gc)
            else:
                res = run_trl(work, data, a.steps, i, env, a.trl_gc)
            rows.append((side, i, res))
            print(f"  {res['tokens_per_s']:,.0f} tok/s, {res['steps_per_s']:.3f} steps/s", file=sys.stderr, flush=True)

    print(f"\n`{C.command_line()}`  ")
    print(f"{C.machine()}; {C.versions()}  ")
    print(f"{a.n:,} chats, max_length {C.MAX_LENGTH}, global batch {C.GLOBAL_BATCH} = {C.PER_DEVICE} x {C.ACCUM} x "
          f"{C.WORLD} CPU ranks, {a.steps} steps per run (steady state = steps 2..{a.steps}), "
          f"distsft gradient_checkpointing={a.distsft_gc}{' (src ' + str(a.distsft_src) + ')' if a.distsft_src else ''}, "
          f"TRL gradient_checkpointing={a.trl_gc}\n")
    print("| run | side | real tokens/s (mean) | real tokens/s (median step) | steps/s (mean) | steps/s (median step) "
          "| real tokens/step | CPU s/step (2 ranks) | real tokens per CPU s | peak RSS per rank (MB) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for side, i, r in rows:
        r["tokens_per_cpu_s"] = r["tokens_per_step"] / r["cpu_per_step"]
        rss = " / ".join(f"{x:,.0f}" for x in r["peak_rss_mb"])
        print(f"| {i + 1} | {side} | {r['tokens_per_s']:,.0f} | {r['median_tokens_per_s']:,.0f} | {r['steps_per_s']:.3f} "
              f"| {r['median_steps_per_s']:.3f} | {r['tokens_per_step']:,.0f} | {r['cpu_per_step']:.2f} "
              f"| {r['tokens_per_cpu_s']:,.0f} | {rss} |")
    d = [r for s, _, r in rows if s == "distsft"]
    t = [r for s, _, r in rows if s == peer]
    print(f"\n| ratio distsft / {peer} | real tokens/s (mean) | real tokens/s (median step) | steps/s (mean) "
          "| steps/s (median step) | real tokens per CPU s |")
    print("|---|---|---|---|---|---|")
    keys = ("tokens_per_s", "median_tokens_per_s", "steps_per_s", "median_steps_per_s", "tokens_per_cpu_s")
    pairs = {k: [x[k] / y[k] for x, y in zip(d, t)] for k in keys}
    print("| per adjacent pair | " + " | ".join(", ".join(f"{p:.3f}" for p in pairs[k]) for k in keys) + " |")
    print("| median of pairs | " + " | ".join(f"{statistics.median(pairs[k]):.3f}" for k in keys) + " |")
    print("| best vs best | " + " | ".join(f"{max(x[k] for x in d) / max(y[k] for y in t):.3f}" for k in keys) + " |")

if __name__ == "__main__":
    main()
