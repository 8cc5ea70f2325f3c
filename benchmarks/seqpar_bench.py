"""Sequence parallelism on 2 CPU ranks: peak activation memory per rank and tokens/s at
`sequence_parallel_size` 1 vs 2, and the longest sequence that trains within a per-rank budget.

Each measurement is a fresh pair of gloo processes (so the high-water marks are its own) running one
training micro-step (forward + backward, loss token-weighted as distsft computes it) of a Llama built
from a config (wider than the tiny example, so activations dominate; random weights, nothing
downloaded) on one packed row of `length` tokens: examples of 200-1200 tokens, the last one straddling
the shard border.
  * sp=1: the data-parallel layout: each rank holds a whole row (two rows per step over the pair).
  * sp=2: DeepSpeed Ulysses through distsft's isolating attention (train.seqpar): the pair shares one
    row, each rank holding half of it.
Memory is the rise of the rank's peak RSS (VmHWM) over its level after loading the model and running
a short warm-up step: the activation (and gradient) memory of the step. tokens/s counts the tokens the
pair trains per second of the measured step (sp=1: 2 x length; sp=2: length).

    python benchmarks/seqpar_bench.py --lengths 2048 4096 8192 16384        # the table
    python benchmarks/seqpar_bench.py --lengths 2048 --budget-gb 1.0 --search  # + the longest that fits
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

CONFIG = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=4, head_dim=32, vocab_size=512, max_position_embeddings=131072,
              rms_norm_eps=1e-6, tie_word_embeddings=False)


LAYOUT_NAMES = {(1, "mask"): "sp=1, 4-D block mask", (1, "examples"): "sp=1, per-example attention",
                (2, "examples"): "sp=2 Ulysses, per-example"}


def _vmhwm_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def _reset_hwm() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS to the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _row(length: int, seed: int):
    import torch
    g = torch.Generator().manual_seed(seed)
    lengths, left = [], length
    while left > 0:
        n = min(left, int(torch.randint(200, 1200, (1,), generator=g)))
        lengths.append(n)
        left -= n
    ids = torch.randint(5, CONFIG["vocab_size"], (1, length), generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, torch.cumsum(torch.tensor([0] + lengths[:-1]), 0)] = -100
    return ids, pos, labels


def _worker(rank: int, port: int, sp: int, mode: str, length: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2")
    import torch
    import torch.distributed as tdist
    torch.set_num_threads(1)
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM
    from distsft.train import seqpar
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    attn = "sdpa"
    if mode == "examples" and sp == 1:
        # The per-example attention without sequence parallelism: no L x L mask at all (the mask function
        # returns None and the isolating core splits the row at position resets), to tell the two apart.
        from transformers import AttentionInterface
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        from transformers.masking_utils import AttentionMaskInterface
        AttentionInterface.register("distsft_examples", seqpar.isolating(sdpa_attention_forward, "sdpa"))
        AttentionMaskInterface.register("distsft_examples", lambda *a, **k: None)
        attn = "distsft_examples"
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attn_implementation=attn)).train()
    layout = seqpar.Layout(2, rank, sp)
    if sp > 1:
        from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
        seqpar.install()
        UlyssesSPAttentionHF.register_with_transformers(model, core_attn_implementation="sdpa",
                                                       sequence_parallel_size=sp, micro_batch_size=1)
        group = seqpar.sp_group()

    def step(n: int, seed: int) -> None:
        ids, pos, labels = _row(n, seed if sp > 1 else seed + rank)  # sp=1: each rank its own row
        inputs, shifted = seqpar.shard_rows({"input_ids": ids, "position_ids": pos}, labels, layout)
        local, count = seqpar.shard_token_loss(model, {**inputs, "shift_labels": shifted})
        tokens = torch.tensor(float(count))
        tdist.all_reduce(tokens)
        loss = (seqpar.scaled_group_loss(local, tokens, group, 2 // sp) if sp > 1 else local * 2 / tokens)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(256 * sp, 1)  # warm-up: kernels, allocator, gradient buffers
    tdist.barrier()
    _reset_hwm()
    base = _vmhwm_kb()
    tdist.barrier()
    t0 = time.perf_counter()
    step(length, 2)
    tdist.barrier()
    elapsed = time.perf_counter() - t0
    peak = _vmhwm_kb()
    Path(out, f"r{rank}.json").write_text(json.dumps({"delta_kb": peak - base, "seconds": elapsed}))
    tdist.destroy_process_group()


def measure(sp: int, length: int, mode: str = "mask") -> dict:
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as out:
        try:
            mp.start_processes(_worker, args=(port, sp, mode, length, out), nprocs=2, start_method="spawn")
        except Exception as exc:  # noqa: BLE001 - a length that does not fit is a row of the table
            return {"sp": sp, "mode": mode, "length": length, "error": str(exc).splitlines()[-1][:120]}
        ranks = [json.loads(Path(out, f"r{r}.json").read_text()) for r in range(2)]
    secs = max(r["seconds"] for r in ranks)
    trained = length * (2 if sp == 1 else 1)
    return {"sp": sp, "mode": mode, "length": length, "act_gb": max(r["delta_kb"] for r in ranks) / 2**20,
            "seconds": secs, "tokens_per_s": trained / secs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    ap.add_argument("--budget-gb", type=float, default=None,
                    help="with --search: the activation budget per rank that decides 'fits'")
    ap.add_argument("--search", action="store_true", help="per layout, double the length from the first "
                    "one until the budget is exceeded")
    ap.add_argument("--mask-up-to", type=int, default=4096,
                    help="measure the 4-D mask layout (O(L^2) memory) only up to this length in the table")
    args = ap.parse_args()
    layouts = [(1, "mask"), (1, "examples"), (2, "examples")]
    rows = [measure(sp, n, mode) for n in args.lengths for sp, mode in layouts
            if mode != "mask" or n <= args.mask_up_to]
    print(f"{'length':>8} {'layout':<28} {'act GiB/rank':>13} {'step s':>8} {'tokens/s':>9} {'vs sp=1 per-ex':>15}")
    by = {(r["sp"], r["mode"], r["length"]): r for r in rows}
    for r in rows:
        name = LAYOUT_NAMES[(r["sp"], r["mode"])]
        if "error" in r:
            print(f"{r['length']:>8} {name:<28} failed: {r['error']}")
            continue
        base = by.get((1, "examples", r["length"]), {}).get("act_gb")
        ratio = f"{r['act_gb'] / base:.2f}x" if base else ""
        print(f"{r['length']:>8} {name:<28} {r['act_gb']:>13.3f} {r['seconds']:>8.2f} "
              f"{r['tokens_per_s']:>9,.0f} {ratio:>15}")
    if args.search and args.budget_gb:
        for sp, mode in layouts:
            n, best = args.lengths[0], None
            while True:
                r = measure(sp, n, mode)
                print(f"  search {LAYOUT_NAMES[(sp, mode)]}, length {n}: "
                      + (f"{r['act_gb']:.3f} GiB" if "act_gb" in r else r.get("error", "")), flush=True)
                if "act_gb" not in r or r["act_gb"] > args.budget_gb:
                    break
                best, n = n, n * 2
            print(f"longest length within {args.budget_gb} GiB/rank, {LAYOUT_NAMES[(sp, mode)]}: {best}")


if __name__ == "__main__":
    main()
