"""Export peak memory vs the model's size (issue 22): `distsft export` streams a tensor at a time.

A ~100M-parameter Llama (hidden 768, 12 layers, vocab 16000; ~400 MB in fp32) is saved as a run's final
model (full fine-tuning) and, with a LoRA adapter (r 16 on every linear layer, non-zero B), as a LoRA
run's final adapter. Each case is exported in a fresh child process with 100 MB shards; the child
samples its resident memory (VmRSS, every 2 ms, file pages mapped by safetensors included) from just before
the export to its end; the export's memory is the highest sample minus the RSS just before. For scale, the same child also runs the usual in-memory path (`from_pretrained` +
`save_pretrained`, or PEFT `merge_and_unload` + `save_pretrained`) in another process.

Target: export memory <= 1.5 x one shard + the largest tensor.

    python benchmarks/export_memory.py [--shard-mb 100] [--work /tmp/distsft-bench/export]

Prints a table; writes only under the work directory. Not a test (no timing or memory assertion).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-llama"

CHILD = r"""
import json, sys, time
from pathlib import Path
kind, run, out, shard = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4]
import torch, transformers, peft, safetensors  # the libraries both paths load, before the baseline
from distsft.posttrain.export import ExportRequest, export
import gc, threading
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
top = [0]
def sample():
    while True:
        top[0] = max(top[0], rss()); time.sleep(0.002)
gc.collect(); base = rss(); top[0] = base
threading.Thread(target=sample, daemon=True).start(); t = time.time()
if kind == "distsft":
    export(ExportRequest(run, out, merge=True, overwrite=True, max_shard_size=shard), say=lambda s: None)
elif kind == "hf-full":
    m = transformers.AutoModelForCausalLM.from_pretrained(run, dtype=torch.float32)
    m.save_pretrained(out, max_shard_size=shard)
else:
    m = peft.AutoPeftModelForCausalLM.from_pretrained(run, dtype=torch.float32).merge_and_unload()
    m.save_pretrained(out, max_shard_size=shard)
secs = time.time() - t; time.sleep(0.05)
print(json.dumps({"baseline": base, "peak": top[0], "seconds": secs}))
"""


def make_model(work: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    d = work / "base-100m"
    if (d / "config.json").is_file():
        return d
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                      num_key_value_heads=4, vocab_size=16000, max_position_embeddings=1024, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(d, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(TINY).save_pretrained(d)
    return d


def make_run(work: Path, base: Path, lora: bool) -> Path:
    import torch
    from distsft.config.spec import dump_spec, validate
    run = work / ("run-lora" if lora else "run-full")
    if (run / "run.yaml").is_file():
        return run
    run.mkdir(parents=True, exist_ok=True)
    spec = validate({"model": {"name_or_path": str(base)}, "data": {"train_files": [str(ROOT / "examples/data/train.jsonl")]},
                     "peft": {"method": "lora" if lora else "none", "r": 16, "lora_alpha": 32,
                              "target_modules": "all-linear"}, "output_dir": str(run)})
    dump_spec(spec, run / "run.yaml")
    if not lora:
        for f in base.iterdir():
            shutil.copy2(f, run / f.name)
        return run
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.save_pretrained(run)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy2(base / f, run / f)
    return run


def child(kind: str, run: Path, out: Path, shard: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    p = subprocess.run([sys.executable, "-c", CHILD, kind, str(run), str(out), shard], capture_output=True, text=True,
                       env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    if p.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shard-mb", type=int, default=100)
    ap.add_argument("--work", type=Path, default=Path("/tmp/distsft-bench/export"))
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    base = make_model(a.work)
    from safetensors import safe_open
    sizes = []
    with safe_open(str(base / "model.safetensors"), framework="pt") as h:
        for k in h.keys():
            s = h.get_slice(k)
            n = 1
            for d in s.get_shape():
                n *= d
            sizes.append(n * 4)
    total, largest, shard = sum(sizes), max(sizes), a.shard_mb * 10**6
    target = 1.5 * shard + largest
    mb = 1e6
    print(f"model: {total / 4 / 1e6:.0f}M params, {total / mb:.0f} MB fp32; largest tensor {largest / mb:.0f} MB; "
          f"shards of {shard / mb:.0f} MB; target <= 1.5 x shard + largest = {target / mb:.0f} MB\n")
    print("| case | path | export memory (peak RSS - RSS before) | x target | peak RSS | seconds |")
    print("|---|---|---:|---:|---:|---:|")
    for lora in (False, True):
        run = make_run(a.work, base, lora)
        case = "LoRA merged" if lora else "full"
        for kind in ("distsft", "hf-lora" if lora else "hf-full"):
            r = child(kind, run, a.work / f"out-{kind}", f"{a.shard_mb}MB")
            used = r["peak"] - r["baseline"]
            path = "distsft export (streamed)" if kind == "distsft" else \
                ("PEFT merge_and_unload + save_pretrained" if lora else "from_pretrained + save_pretrained")
            print(f"| {case} | {path} | {used / mb:,.0f} MB | {used / target:.2f} | {r['peak'] / mb:,.0f} MB | "
                  f"{r['seconds']:.1f} |", flush=True)
    print(f"\ncommand: python benchmarks/export_memory.py --shard-mb {a.shard_mb}")


if __name__ == "__main__":
    main()
