"""FSDP2 host memory on CPU (2 ranks over gloo), issue 19: what gradient accumulation and model loading
cost per rank, with distsft's settings against the old ones.

    python benchmarks/fsdp_memory.py [--layers 12]      # prints two tables

A Llama of ~100M parameters is built from a config (no download) and saved once under /tmp. Each
configuration runs as its own `torchrun --nproc_per_node 2` of this file (`--worker`), so each rank's
resident memory (RSS, sampled every 5 ms by a thread) belongs to that configuration alone.

1. Accumulation: peak RSS of a rank during 12 micro-batches (fp32, 1 x 256 tokens each: 12 optimizer
   steps at accumulation 1, 3 at 4) above its RSS when training begins (model prepared). On CPU a rank's
   gradients live in host memory, so the unsharded gradient HF's `no_sync` keeps between micro-batches
   shows here. The workers run with MALLOC_MMAP_THRESHOLD_=65536, so that freed tensors return to the
   system and RSS follows live memory instead of glibc's free lists (which grow with the number of
   allocations, not with what is alive).
     distsft   accumulation 4 with sync_each_batch (train.fsdp.sync_each_batch)
     old       accumulation 4 under no_sync (distributed.sync_each_batch: false)
2. Loading a bf16 checkpoint (as hub models are stored) for full fine-tuning in fp32: the ranks' summed
   RSS increase while `train.model.load_model` runs (the copies of the weights the ranks hold before
   sharding), and through accelerate's prepare (sharding included; on
   CPU the shards are host memory too, one fp32 copy in total), in units of one fp32 copy.
     distsft   rank 0 reads, rank 1 builds uninitialised storage (train.rank0_load), accelerate broadcasts
     old       every rank runs from_pretrained (fsdp_cpu_ram_efficient_loading: false)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_model(path: Path, layers: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=12,
                      num_key_value_heads=12, vocab_size=32000, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    n = sum(p.numel() for p in model.parameters())
    if not (path / "model.safetensors").exists():
        # Stored in bf16, as hub checkpoints are: full fine-tuning loads fp32 masters, so every rank
        # that reads it materialises an fp32 copy (an fp32 file would be memory-mapped without a copy).
        model.to(torch.bfloat16).save_pretrained(path)
    return n


def _anon() -> int:
    """Anonymous resident memory (RssAnon): what the process itself allocated, without memory-mapped
    file pages (the page cache of a checkpoint file, shared and reclaimable)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


class Peak:
    def __init__(self) -> None:
        import psutil
        self.proc, self.peak, self.anon, self.stop = psutil.Process(), 0, 0, False
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.anon = max(self.anon, _anon())

    def _run(self) -> None:
        while not self.stop:
            self._sample()
            time.sleep(0.005)

    def start(self) -> "Peak":
        self._sample()
        self.thread.start()
        return self

    def end(self) -> int:
        self.stop = True
        self.thread.join()
        self._sample()
        return self.peak


def worker(model_dir: str, out: str, accumulation: int, sync: bool, rank0: bool) -> None:
    import psutil
    import torch
    sys.path.insert(0, str(ROOT / "src"))
    from distsft.config.spec import RunSpec
    from distsft.runtime import devices, dist
    from distsft.train import fsdp, model as model_lib
    spec = RunSpec.model_validate({
        "model": {"name_or_path": model_dir}, "data": {"train_files": [str(ROOT / "examples/data/train.jsonl")]},
        "distributed": {"backend": "fsdp", "gpus_per_node": 2, **({} if sync else {"sync_each_batch": False})},
        "output_dir": out})
    devices.setup_rank("fsdp")
    dist.init_early(False)
    e = dist.env()
    fsdp.allow_cpu_fsdp()
    from transformers import Trainer, TrainerCallback, TrainingArguments
    cfg = fsdp.trainer_fsdp_config(spec, [])
    cfg["cpu_ram_efficient_loading"] = rank0
    acc = fsdp.accelerator_config(spec, accumulation)
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=1, gradient_accumulation_steps=accumulation,
                             max_steps=max(1, 12 // accumulation) if not os.environ.get("FSDP_MEMORY_LOAD_ONLY") else 1, learning_rate=1e-4, use_cpu=True, ddp_backend="gloo", fsdp=True,
                             fsdp_config=cfg, report_to="none", save_strategy="no", disable_tqdm=True,
                             logging_steps=100, **({"accelerator_config": acc} if acc else {}))
    proc = psutil.Process()
    base, base_anon = proc.memory_info().rss, _anon()
    peak = Peak().start()
    if rank0:
        model = model_lib.load_model(spec, "no", "sdpa", torch.device("cpu"))
    else:  # the old path: every rank reads the weights
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    load_peak = peak.end()
    fsdp.wrap_layers_of(args, model, "no")
    res = {"rank": e.rank, "load": load_peak - base, "load_anon": peak.anon - base_anon}
    marks: dict = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, *a, **k):
            marks["prepared_peak"] = marks["prep"].end()
            marks["prepared_anon"] = max(marks["prep"].anon, peak.anon)
            marks["train_base"] = proc.memory_info().rss
            marks["train"] = Peak().start()

    marks["prep"] = Peak().start()
    ids = torch.randint(3, 32000, (32, 256), generator=torch.Generator().manual_seed(0))
    ds = [{"input_ids": x, "labels": x.clone(), "attention_mask": torch.ones_like(x)} for x in ids]
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[Probe()])
    trainer.train()
    res["through_prepare"] = marks["prepared_peak"] - base
    res["through_prepare_anon"] = marks["prepared_anon"] - base_anon
    res["train"] = marks["train"].end() - marks["train_base"]
    Path(out, f"rank{e.rank}.json").write_text(json.dumps(res))
    dist.barrier()


def run(model_dir: Path, work: Path, name: str, accumulation: int, sync: bool, rank0: bool,
        reuse: bool = False) -> list[dict]:
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    if reuse and all((out / f"rank{r}.json").exists() for r in (0, 1)):
        print(f"({name}: results of an earlier invocation reused)")
        return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    for old in out.glob("rank*.json"):  # a result is this invocation's or none
        old.unlink()
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29761",
           __file__, "--worker", str(model_dir), str(out), str(accumulation), str(int(sync)), str(int(rank0))]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{name} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=5)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--only", choices=["accumulation", "load"], help="one of the two tables")
    ap.add_argument("--reuse", action="store_true", help="reuse a configuration's results already in the work dir")
    a = ap.parse_args()
    if a.worker:
        m, out, accum, sync, rank0 = a.worker
        worker(m, out, int(accum), sync == "1", rank0 == "1")
        return
    work = Path(tempfile.gettempdir()) / "distsft-fsdp-memory"
    model_dir = work / f"llama-{a.layers}l-bf16"
    n = make_model(model_dir, a.layers)
    fp32 = n * 4
    mib = lambda b: f"{b / 2**20:,.0f}"  # noqa: E731
    print(f"model: {n / 1e6:.1f}M parameters, one fp32 copy {mib(fp32)} MiB; 2 CPU ranks over gloo\n")
    if a.only != "load":
        one = run(model_dir, work, "accum1", 1, True, True, a.reuse)
        four = run(model_dir, work, "accum4", 4, True, True, a.reuse)
        old4 = run(model_dir, work, "accum4-nosync", 4, False, True, a.reuse)
        print("| accumulation | training peak above prepared, rank 0 / rank 1 (MiB) | vs accumulation 1 |")
        print("| --- | --- | --- |")
        ref = max(r["train"] for r in one)
        for label, rs in (("1", one), ("4, sync_each_batch (distsft)", four), ("4, no_sync (old)", old4)):
            peak = max(r["train"] for r in rs)
            print(f"| {label} | {mib(rs[0]['train'])} / {mib(rs[1]['train'])} | {peak / ref:.2f}x |")
    if a.only == "accumulation":
        return
    os.environ["FSDP_MEMORY_LOAD_ONLY"] = "1"  # one step: only the loading is measured
    new = run(model_dir, work, "load-rank0", 1, True, True)
    old = run(model_dir, work, "load-every-rank", 1, True, False)
    print("\n| loading (bf16 file, fp32 weights) | summed RSS in load_model: all / anonymous (MiB, x fp32 copy) "
          "| through prepare: all / anonymous (MiB, x) |")
    print("| --- | --- | --- |")
    for label, rs in (("rank 0 reads, broadcast (distsft)", new), ("every rank reads (old)", old)):
        cells = []
        for key in ("load", "through_prepare"):
            t, an = sum(r[key] for r in rs), sum(r.get(key + "_anon", 0) for r in rs)
            cells.append(f"{mib(t)} ({t / fp32:.2f}x) / {mib(an)} ({an / fp32:.2f}x)")
        print(f"| {label} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
