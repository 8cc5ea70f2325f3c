"""Examples/s of distsft's tokenize+mask+pack vs TRL SFTTrainer's own dataset preparation.

Both sides get the same 50,000 in-memory conversations (the generator of examples/make_tiny.py with
other seeds, so the same task mix as examples/data/train.jsonl without duplicates), the same tiny
tokenizer and max_length, packing on, loss on assistant tokens only:

  distsft: data.build.build (one process: data.num_proc 1) from a JSONL of the same conversations
  TRL:     SFTTrainer._prepare_dataset, with assistant_only_loss=True, packing_strategy="bfd",
           dataset_num_proc=None (TRL reads the {% generation %} markers of the tiny template)

Each side runs in its own process so that peak RSS is its own. Afterwards the per-example
(input_ids, labels) multisets are compared before packing (TRL run again with packing off) and
after packing (rows split back into examples with seq_lengths).

    python benchmarks/data_prep_bench.py [--n 50000] [--max-length 1024]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-llama"


def make_conversations(n: int) -> list[list[dict]]:
    spec = importlib.util.spec_from_file_location("make_tiny", ROOT / "examples" / "make_tiny.py")
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    rng = random.Random(7)
    words = mt.make_words(random.Random(mt.SEED))
    return [mt.conversation(rng, words)["messages"] for _ in range(n)]


def digest(pairs) -> tuple[str, int]:
    """Order-independent hash of a multiset of (input_ids, labels) examples."""
    hs = sorted(hashlib.sha1(json.dumps([list(map(int, i)), list(map(int, l))]).encode()).hexdigest()
                for i, l in pairs)
    return hashlib.sha256("".join(hs).encode()).hexdigest()[:16], len(hs)


def unpack(ds) -> list:
    out = []
    for ids, labels, lens in zip(ds["input_ids"], ds["labels"], ds["seq_lengths"]):
        p = 0
        for n in lens:
            out.append((ids[p:p + n], labels[p:p + n]))
            p += n
    return out


def run_ours(convs: list, max_length: int) -> dict:
    from transformers import AutoTokenizer
    from distsft.config.sections import DataSpec
    from distsft.data.build import build
    tok = AutoTokenizer.from_pretrained(TINY)
    work = Path(tempfile.mkdtemp())
    src = work / "chats.jsonl"
    src.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    spec = DataSpec(train_files=[str(src)], max_length=max_length, packing=True, num_proc=1)
    t0 = time.perf_counter()
    ds, stats = build(spec, tok, "train", work / "cache")
    dt = time.perf_counter() - t0
    examples = unpack(ds)  # the rows split back into examples: the same multiset before packing
    return {"seconds": dt, "rows": len(ds), "fill": stats["packing_efficiency"],
            "pre": digest(examples), "post": digest(examples)}


def run_trl(convs: list, max_length: int) -> dict:
    import logging
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)
    tok = AutoTokenizer.from_pretrained(TINY)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    small = Dataset.from_dict({"messages": convs[:8]})
    big = Dataset.from_dict({"messages": convs})
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, max_length=max_length, packing=True, packing_strategy="bfd",
                         assistant_only_loss=True, dataset_num_proc=None, report_to="none", use_cpu=True)
        trainer = SFTTrainer(model=model, args=args, processing_class=tok, train_dataset=small)
        t0 = time.perf_counter()
        packed = trainer._prepare_dataset(big, tok, args, True, None, "train")
        dt = time.perf_counter() - t0
        unpacked = trainer._prepare_dataset(big, tok, args, False, None, "train")
    fill = sum(map(len, packed["input_ids"])) / (len(packed) * max_length)
    return {"seconds": dt, "rows": len(packed), "fill": fill,
            "pre": digest(zip(unpacked["input_ids"], unpacked["labels"])), "post": digest(unpack(packed))}


def child(which: str, n: int, max_length: int, out: str) -> None:
    convs = make_conversations(n)
    res = (run_ours if which == "ours" else run_trl)(convs, max_length)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(out).write_text(json.dumps(res))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--max-length", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=2,
                    help="runs per side, alternating; the fastest counts (the machine may be shared)")
    ap.add_argument("--child", choices=["ours", "trl"])
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.n, args.max_length, args.out)
    results: dict[str, dict] = {}
    for _ in range(args.repeat):
        for which in ("ours", "trl"):
            with tempfile.NamedTemporaryFile(suffix=".json") as f:
                env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
                subprocess.run([sys.executable, __file__, "--child", which, "--n", str(args.n), "--max-length",
                                str(args.max_length), "--out", f.name], check=True, env=env)
                res = json.loads(Path(f.name).read_text())
            if which not in results or res["seconds"] < results[which]["seconds"]:
                results[which] = res
    print(f"\n`python benchmarks/data_prep_bench.py --n {args.n} --max-length {args.max_length} "
          f"--repeat {args.repeat}` ({os.cpu_count()} CPU cores, tokenizer {TINY.name}, best of {args.repeat})\n")
    print("| pipeline | seconds | examples/s | rows | fill | peak RSS MB | (ids, labels) hash before / after packing |")
    print("|---|---|---|---|---|---|---|")
    names = {"ours": "distsft tokenize+mask+pack", "trl": "TRL SFTTrainer._prepare_dataset"}
    for k, r in results.items():
        print(f"| {names[k]} | {r['seconds']:.2f} | {args.n / r['seconds']:,.0f} | {r['rows']} | "
              f"{100 * r['fill']:.2f}% | {r['peak_rss_mb']:.0f} | {r['pre'][0]} / {r['post'][0]} |")
    o, t = results["ours"], results["trl"]
    print(f"\nspeed-up: {t['seconds'] / o['seconds']:.2f}x; same examples before packing: {o['pre'] == t['pre']}; "
          f"same examples after packing: {o['post'] == t['post']}")


if __name__ == "__main__":
    main()
