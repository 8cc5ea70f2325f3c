"""The data build at scale: peak memory at 50,000 vs 500,000 chats, throughput with 1 and 2 workers, and
TRL SFTTrainer's preparation (dataset_num_proc=2) on the same data, side by side in one run.

Data: synthetic chats (a system prompt sometimes, 1-3 user/assistant turns of words from the tiny
tokenizer's vocabulary), turn lengths lognormal so a chat averages ~385 tokens, JSON Lines; written
once under the work directory. Each measurement runs in its own process, one at a time:

  distsft  data.build(spec, tokenizer, "train", fresh cache) with data.num_proc = 1 or 2: read the JSONL
           in chunks, tokenize + mask in the workers, spill, pack BFD, write the Arrow cache
  TRL      load_dataset("json") + SFTTrainer._prepare_dataset (assistant_only_loss, packing bfd,
           dataset_num_proc=2) -- what TRL does before training
  old      the pre-streaming build (git rev OLD_REV of distsft.data.build), 50,000 only, for contrast

Peak RSS: ru_maxrss of the measuring process (the main process of the build), and of its largest
worker (RUSAGE_CHILDREN). Packing: rows vs the lower bound ceil(tokens / max_length).

    python benchmarks/build_scale.py [--small 50000] [--large 500000] [--max-length 2048] [--skip-large]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-llama"
WORK = Path(os.environ.get("DISTSFT_BENCH_DIR", "/tmp/distsft-bench")) / "build-scale"
OLD_REV = "d28e4e9"  # the last commit before the streaming build


def make_chats(n: int, seed: int = 11) -> Path:
    path = WORK / "data" / f"chats-{n}-lognormal.jsonl"
    if path.exists():
        return path
    sys.path.insert(0, str(ROOT / "examples"))
    import make_tiny as mt
    words = mt.make_words(random.Random(mt.SEED))
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": rng.choice(mt.SYSTEMS)}] if rng.random() < 0.3 else []
            for _ in range(rng.choice((1, 1, 2, 3))):
                for role in ("user", "assistant"):
                    k = max(1, min(1500, int(rng.lognormvariate(3.28, 0.9))))
                    msgs.append({"role": role, "content": " ".join(rng.choice(words) for _ in range(k))})
            f.write(json.dumps({"messages": msgs}) + "\n")
    tmp.rename(path)
    return path


class Descendants:
    """Peak RSS (VmHWM) and CPU time of every descendant process, polled every 0.2 s: the build's
    workers fork from a forkserver, so they are not this process' children for getrusage."""

    def __init__(self) -> None:
        import threading
        self.hwm: dict[int, float] = {}
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        import psutil
        me = psutil.Process()
        while not self._stop.wait(0.2):
            for p in me.children(recursive=True):
                try:
                    status = Path(f"/proc/{p.pid}/status").read_text()
                    hwm = next(int(x.split()[1]) for x in status.splitlines() if x.startswith("VmHWM"))
                    t = p.cpu_times()
                    self.hwm[p.pid] = max(self.hwm.get(p.pid, 0), hwm / 1024)
                    self.cpu[p.pid] = t.user + t.system
                except (OSError, StopIteration, psutil.Error):
                    continue

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"worker_rss_mb": max(self.hwm.values(), default=0.0), "workers": len(self.hwm),
                "worker_rss_sum_mb": sum(self.hwm.values()), "worker_cpu_s": sum(self.cpu.values()),
                "worker_cpu_max_s": max(self.cpu.values(), default=0.0)}


_WATCH: Descendants | None = None


def _peaks() -> dict:
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = _WATCH.stop() if _WATCH else {}
    return {"rss_mb": me.ru_maxrss / 1024, "cpu_s": me.ru_utime + me.ru_stime + kids.get("worker_cpu_s", 0.0),
            **kids}


def child_distsft(data: Path, num_proc: int | None, max_length: int) -> dict:
    """One build into a throwaway cache. num_proc None: the old code's DataSpec (it has no such key)."""
    from transformers import AutoTokenizer
    from distsft.data import build as d
    from distsft.config.sections import DataSpec
    tok = AutoTokenizer.from_pretrained(TINY)
    cache = Path(tempfile.mkdtemp(dir=WORK))
    try:
        extra = {} if num_proc is None else {"num_proc": num_proc}
        spec = DataSpec(train_files=[str(data)], max_length=max_length, **extra)
        t0 = time.perf_counter()
        ds, stats = d.build(spec, tok, "train", cache)
        dt = time.perf_counter() - t0
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return {"seconds": dt, "examples": stats["num_examples"], "tokens": stats["num_tokens"], "rows": stats["num_rows"],
            "lower_bound": stats["lower_bound_rows"], **_peaks()}


def child_trl(data: Path, max_length: int) -> dict:
    import logging
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    datasets.disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)
    tok = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    hf_cache = tempfile.mkdtemp(dir=WORK)
    try:
        with tempfile.TemporaryDirectory(dir=WORK) as out:
            small = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "a"},
                                                              {"role": "assistant", "content": "b"}]]})
            args = SFTConfig(output_dir=out, max_length=max_length, packing=True, packing_strategy="bfd",
                             assistant_only_loss=True, dataset_num_proc=2, report_to="none", use_cpu=True)
            trainer = SFTTrainer(model=model, args=args, processing_class=tok, train_dataset=small)
            t0 = time.perf_counter()
            raw = datasets.load_dataset("json", data_files=str(data), split="train", cache_dir=hf_cache)
            packed = trainer._prepare_dataset(raw, tok, args, True, None, "train")
            dt = time.perf_counter() - t0
            tokens = sum(len(x) for x in packed["input_ids"])
    finally:
        shutil.rmtree(hf_cache, ignore_errors=True)
    return {"seconds": dt, "examples": None, "tokens": tokens, "rows": len(packed),
            "lower_bound": -(-tokens // max_length), **_peaks()}


def run_child(kind: str, data: Path, max_length: int, num_proc: int = 1, old_src: str = "") -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", dir=WORK) as f:
        env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false",
               "PYTHONPATH": old_src or os.environ.get("PYTHONPATH", "")}
        subprocess.run([sys.executable, __file__, "--child", kind, "--data", str(data), "--max-length",
                        str(max_length), "--num-proc", str(num_proc), "--out", f.name], check=True, env=env)
        return json.loads(Path(f.name).read_text())


def old_source() -> str:
    dest = WORK / f"old-{OLD_REV}"
    if not (dest / "distsft").exists():
        dest.mkdir(parents=True, exist_ok=True)
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", OLD_REV, "src"], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest), "--strip-components=1"], input=tar, check=True)
    return str(dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=50_000)
    ap.add_argument("--large", type=int, default=500_000)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--runs", default="two,one,trl,old,large",
                    help="which measurements: two / one (distsft, 2 workers / 1 process, small), trl, old, large")
    ap.add_argument("--repeat", type=int, default=1,
                    help="rounds of the small runs, alternating; the fastest of each counts (the machine is shared)")
    ap.add_argument("--child", choices=["distsft", "trl", "old"])
    ap.add_argument("--data", type=Path)
    ap.add_argument("--num-proc", type=int, default=1)
    ap.add_argument("--out")
    a = ap.parse_args()
    if a.child:
        global _WATCH
        _WATCH = Descendants()
        if a.child == "distsft":
            res = child_distsft(a.data, a.num_proc, a.max_length)
        elif a.child == "old":
            res = child_distsft(a.data, None, a.max_length)
        else:
            res = child_trl(a.data, a.max_length)
        Path(a.out).write_text(json.dumps(res))
        return
    WORK.mkdir(parents=True, exist_ok=True)
    small = make_chats(a.small)
    want = set(a.runs.split(","))
    if a.skip_old:
        want.discard("old")
    if a.skip_large:
        want.discard("large")
    runs = [r for name, r in (("two", ("distsft", a.small, small, 2)), ("one", ("distsft", a.small, small, 1)),
                              ("trl", ("trl", a.small, small, 2)), ("old", ("old", a.small, small, 1)))
            if name in want]
    runs = runs * a.repeat
    if "large" in want:
        runs.append(("distsft", a.large, make_chats(a.large), 2))
    res = {}
    load = os.getloadavg()
    for kind, n, path, procs in runs:
        print(f"{kind} {n:,} chats, {procs} process(es) ...", file=sys.stderr, flush=True)
        src = old_source() if kind == "old" else ""
        r = run_child(kind, path, a.max_length, procs, src)
        print(f"  {r}", file=sys.stderr, flush=True)
        if (kind, n, procs) not in res or r["seconds"] < res[(kind, n, procs)]["seconds"]:
            res[(kind, n, procs)] = r
    print(f"\n`python benchmarks/build_scale.py --small {a.small} --large {a.large} --max-length {a.max_length} "
          f"--runs {','.join(sorted(want))} --repeat {a.repeat}` (fastest of {a.repeat} per small run)  ")
    print(f"{os.cpu_count()} CPU cores (affinity {len(os.sched_getaffinity(0))}), load average at start "
          f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (shared machine), tokenizer {TINY.name}, "
          f"max_length {a.max_length}\n")
    print("| build | chats | processes | seconds | chats/s | tokens | rows | rows / lower bound | "
          "peak RSS main, MB | peak RSS per worker (max), MB | peak RSS main + workers, MB | CPU s (all processes) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    names = {"distsft": "distsft streaming", "trl": "TRL SFTTrainer prep", "old": f"distsft before ({OLD_REV})"}
    for (kind, n, procs), r in res.items():
        print(f"| {names[kind]} | {n:,} | {procs} | {r['seconds']:.1f} | {n / r['seconds']:,.0f} | {r['tokens']:,} | "
              f"{r['rows']:,} | {r['rows'] / r['lower_bound']:.5f} | {r['rss_mb']:,.0f} | {r['worker_rss_mb']:,.0f} | "
              f"{r['rss_mb'] + r.get('worker_rss_sum_mb', 0):,.0f} | {r['cpu_s']:.1f} |")
    two, one, trl = (res.get(("distsft", a.small, 2)), res.get(("distsft", a.small, 1)),
                     res.get(("trl", a.small, 2)))
    if two and one:
        # On a shared machine with autogroup scheduling, a session gets a share of the cores whatever its
        # process count; the busiest process' CPU time is the wall time the build needs on free cores.
        busiest = max(two.get("worker_cpu_max_s", 0.0), two["cpu_s"] - two.get("worker_cpu_s", 0.0))
        print(f"\n2 workers vs 1 process: {one['seconds'] / two['seconds']:.2f}x wall; CPU seconds "
              f"{two['cpu_s']:.0f} (all processes) vs {one['cpu_s']:.0f}; busiest process {busiest:.0f} CPU s, "
              f"so on 2 free cores {one['cpu_s'] / busiest:.2f}x")
    if two and trl:
        print(f"distsft (2 workers) vs TRL (dataset_num_proc=2): {trl['seconds'] / two['seconds']:.2f}x wall")
    if two and ("distsft", a.large, 2) in res:
        big = res[("distsft", a.large, 2)]
        print(f"peak RSS (main) at {a.large:,} / at {a.small:,}: {big['rss_mb'] / two['rss_mb']:.3f} "
              f"({big['rss_mb'] / 1024:.2f} GB at {a.large:,})")


if __name__ == "__main__":
    main()
