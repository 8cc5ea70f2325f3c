"""GPU throughput and MFU of a ~1B-parameter Llama: distsft packed vs padded, and the plain TRL script
(benchmarks/plain_trl.py) packed vs padded, on the same machine. Needs CUDA: it refuses without it.

    python benchmarks/gpu_throughput.py [--gpus 1] [--steps 12] [--n 60000] [--gradient-checkpointing off]

The model is built from a config (random weights, nothing downloaded): Llama architecture, hidden 2048,
22 layers, 32 heads / 4 KV heads, MLP 5632, vocab 32,000 (TinyLlama-1.1B's shape, ~1.1B parameters),
saved once with examples/tiny-llama's tokenizer (its ids are a subset of the vocabulary) so both
distsft and TRL load it from a directory. bf16 mixed precision, attention flash_attention_2 when the
flash-attn package imports and the GPU is sm80+, else sdpa; sequence length 4096; activation
checkpointing the same on both sides, off by default (--gradient-checkpointing on|off: a 1.1B model's
weights, AdamW states and 4096-token activations fit an 80 GB GPU without it, and recomputation would
cost a third more FLOPs that the 6N MFU convention does not count); the data are make_tiny's synthetic
chats.

  packed:  distsft data.packing=true (1 row of 4096 per micro-batch), TRL packing=True (BFD, padding-free)
  padded:  distsft data.packing=false, TRL packing=False; micro-batch of B examples with B chosen so that
           B x mean example length ~ 4096 real tokens, padded to the longest in the micro-batch (sdpa;
           with flash attention distsft concatenates the micro-batch padding-free)
Global batch: --accum (8) micro-batches per GPU per optimizer step, on both sides.

--kernels adds distsft packed runs with `train.torch_compile: true` and, when the liger-kernel package
imports, `model.use_liger_kernel: true` (and both), and prints distsft's own live `mfu` (metrics.jsonl,
trainable-aware 6N, see src/distsft/mfu.py) beside each distsft row.

tokens/s/GPU counts real (non-padding) tokens over steps 3..N. MFU = 6 x parameters x tokens/s/GPU /
peak dense bf16 FLOP/s of the device (attention FLOPs not counted: the usual 6N convention, an
under-estimate at 4096 tokens). Peak by device name: H100 SXM / H200 989e12, H100 PCIe 756e12,
A100 312e12, L40S 362e12, A10 125e12; other devices: pass --peak-tflops.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12),
         ("A10", 125e12)]
SEQ = 4096


def peak_flops(name: str, override: float | None) -> float | None:
    if override:
        return override * 1e12
    for key, v in PEAKS:
        if key.lower() in name.lower():
            return v
    return None


def build_model(path: Path) -> int:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    import common as C
    tok = AutoTokenizer.from_pretrained(C.TINY)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=SEQ,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    if not (path / "config.json").exists():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        del model
        torch.cuda.empty_cache()
    with torch.device("meta"):
        return sum(p.numel() for p in LlamaForCausalLM(cfg).parameters())


def _logged_mfu(out: Path) -> float | None:
    """Mean of distsft's live `mfu` over steps 3..N (absent when the device's peak is unknown)."""
    import common as C
    vals = [r["mfu"] for r in C.read_jsonl(out / "metrics.jsonl") if "mfu" in r and r.get("step", 0) >= 3]
    return sum(vals) / len(vals) if vals else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=1)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--accum", type=int, default=8)
    ap.add_argument("--n", type=int, default=60_000, help="synthetic chats")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--gradient-checkpointing", choices=["on", "off"], default="off")
    ap.add_argument("--work", type=Path, default=Path("/tmp/distsft-bench/gpu"))
    ap.add_argument("--kernels", action="store_true", help="also distsft packed with torch.compile / Liger")
    a = ap.parse_args()

    import torch
    if not torch.cuda.is_available():
        sys.exit("gpu_throughput.py needs a CUDA GPU (torch.cuda.is_available() is False on this machine); "
                 "nothing was run. See BENCHMARKS.md for the CPU benchmarks.")
    if torch.cuda.device_count() < a.gpus:
        sys.exit(f"--gpus {a.gpus} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    import common as C
    name = torch.cuda.get_device_name(0)
    major, _ = torch.cuda.get_device_capability(0)
    attn = "flash_attention_2" if major >= 8 and importlib.util.find_spec("flash_attn") else "sdpa"
    peak = peak_flops(name, a.peak_tflops)
    work = a.work
    work.mkdir(parents=True, exist_ok=True)
    model_dir = work / "llama-1b"
    params = build_model(model_dir)
    data = C.make_data(C.DEFAULT_WORK, a.n)
    mean_tokens = 43.0  # make_tiny chats with the tiny tokenizer: 42.8 tokens mean (distsft plan)
    pad_batch = max(1, round(SEQ / mean_tokens))
    env = C.bench_env(DISTSFT_CACHE_DIR=str(work / "distsft-cache"), HF_DATASETS_CACHE=str(work / "hf-cache"))
    rows = []
    live_mfu: dict[str, float] = {}
    for layout in ("packed", "padded"):
        # distsft
        out = C.fresh(work / f"distsft-{layout}")
        micro = 1 if layout == "packed" else pad_batch
        spec = C.write_spec(work / f"distsft-{layout}.yaml", data=data, output_dir=out, max_steps=a.steps,
                            logging_steps=1, max_length=SEQ, per_device=micro,
                            global_batch=micro * a.accum * a.gpus,
                            gradient_checkpointing=a.gradient_checkpointing == "on",
                            extra={"model": {"name_or_path": str(model_dir), "attn_implementation": attn},
                                   "data": {"packing": layout == "packed"}, "train": {"bf16": True}})
        cmd = [str(C.BIN / "distsft"), "run", str(spec), "--gpus", str(a.gpus)]
        run = C.run_logged(cmd, env=env, rank_pattern="distsft.train", timeout=1800)
        C.check(run, f"distsft {layout}")
        st = C.distsft_steady(C.read_jsonl(out / "metrics.jsonl"), skip=2)
        rows.append(("distsft", layout, st["tokens_per_s"] / a.gpus, st["peak_rss_gb_logged"]))
        live_mfu[f"distsft {layout}"] = _logged_mfu(out)
        # plain TRL
        out = C.fresh(work / f"trl-{layout}")
        cmd = C.plain_trl_cmd(data=data, output_dir=out, max_steps=a.steps, result=out / "result.json",
                              max_length=SEQ, per_device=micro, accum=a.accum,
                              gradient_checkpointing=a.gradient_checkpointing,
                              num_processes=a.gpus, extra=["--bf16", "--attn", attn]
                              + (["--no-packing"] if layout == "padded" else []))
        cmd[cmd.index("--model") + 1] = str(model_dir)
        run = C.run_logged(cmd, env=env, rank_pattern="plain_trl.py", timeout=1800)
        C.check(run, f"TRL {layout}")
        res = C.plain_result(run)
        st = C.steady(res["step_tokens"][2:], res["step_times"][1:])
        rows.append(("TRL", layout, st["tokens_per_s"] / a.gpus, None))

    if a.kernels:
        variants = [("compile", {"train": {"torch_compile": True}})]
        if importlib.util.find_spec("liger_kernel"):
            variants += [("liger", {"model": {"use_liger_kernel": True}}),
                         ("liger+compile", {"model": {"use_liger_kernel": True}, "train": {"torch_compile": True}})]
        for label, extra in variants:
            out = C.fresh(work / f"distsft-{label}")
            merged = {"model": {"name_or_path": str(model_dir), "attn_implementation": attn},
                      "data": {"packing": True}, "train": {"bf16": True}}
            for section, values in extra.items():
                merged[section].update(values)
            spec = C.write_spec(work / f"distsft-{label}.yaml", data=data, output_dir=out, max_steps=a.steps,
                                logging_steps=1, max_length=SEQ, per_device=1, global_batch=a.accum * a.gpus,
                                gradient_checkpointing=a.gradient_checkpointing == "on", extra=merged)
            run = C.run_logged([str(C.BIN / "distsft"), "run", str(spec), "--gpus", str(a.gpus)], env=env,
                               rank_pattern="distsft.train", timeout=1800)
            C.check(run, f"distsft {label}")
            st = C.distsft_steady(C.read_jsonl(out / "metrics.jsonl"), skip=2)
            rows.append(("distsft", f"packed, {label}", st["tokens_per_s"] / a.gpus, st["peak_rss_gb_logged"]))
            live_mfu[f"distsft packed, {label}"] = _logged_mfu(out)

    print(f"\n`{C.command_line()}`  ")
    print(f"{a.gpus} x {name}; {C.versions()}; attention {attn}; {params / 1e9:.2f} B parameters; sequence {SEQ}; "
          f"bf16; activation checkpointing {a.gradient_checkpointing}; {a.steps} steps, steady = steps 3..{a.steps}\n")
    print("| side | layout | real tokens/s/GPU | MFU (6N) | distsft's logged mfu | peak GPU memory GB (distsft's log) |")
    print("|---|---|---|---|---|---|")
    for side, layout, tps, mem in rows:
        mfu = f"{100 * 6 * params * tps / peak:.1f}%" if peak else "? (pass --peak-tflops)"
        live = live_mfu.get(f"{side} {layout}")
        print(f"| {side} | {layout} | {tps:,.0f} | {mfu} | {f'{100 * live:.1f}%' if live else '-'} | "
              f"{f'{mem:.1f}' if mem else '-'} |")
    by = {(s, l): t for s, l, t, _ in rows}
    for layout in ("packed", "padded"):
        print(f"\ndistsft / TRL ({layout}): {by[('distsft', layout)] / by[('TRL', layout)]:.3f}")
    print(f"packed / padded: distsft {by[('distsft', 'packed')] / by[('distsft', 'padded')]:.2f}x, "
          f"TRL {by[('TRL', 'packed')] / by[('TRL', 'padded')]:.2f}x")


if __name__ == "__main__":
    main()
