"""8-bit AdamW (bitsandbytes) vs AdamW (torch): optimizer state bytes per parameter on the same model, and
the loss after N steps of the quickstart task, side by side in one run. CPU is enough (bitsandbytes'
8-bit AdamW runs on CPU).

    python benchmarks/optim_bench.py [--steps 40] [--skip-training]

State bytes: each optimizer is built the way HF's Trainer builds it from `TrainingArguments.optim`, takes
one step on the model's full parameter set (random gradients), and every tensor it holds in its state
(moments, bitsandbytes' quantization maps and block scales) is counted. Models: the quickstart's
examples/tiny-llama (0.1 M parameters: many of its tensors are below bitsandbytes' 4,096-element
threshold, which it keeps in 32 bits) and a Llama of 25 M parameters built from a config (random
weights, nothing downloaded; hidden 512, 8 layers, MLP 1,376, vocab 512).

Loss: `distsft run examples/quickstart.yaml --gpus 2 train.max_steps=N train.optim=...` with everything
else the quickstart's (full fine-tuning, lr 3e-3, cosine, global batch 16), the mean training loss of
the last 5 logged steps and the final eval loss.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

OPTIMIZERS = ("adamw_torch", "adamw_8bit")


def _state_bytes(model, name: str) -> tuple[int, int]:
    """(bytes held in optimizer state, parameters) after one step."""
    import torch
    from transformers import Trainer, TrainingArguments
    args = TrainingArguments("/tmp/distsft-bench/optim-args", optim=name, use_cpu=True, report_to="none",
                             learning_rate=1e-3)
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = cls(params, **kwargs)
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    held = 0
    for state in opt.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                held += v.numel() * v.element_size()
    return held, sum(p.numel() for p in params)


def _models():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
    import common as C
    yield "examples/tiny-llama", AutoModelForCausalLM.from_pretrained(C.TINY)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=False)
    yield "Llama 25M (config)", LlamaForCausalLM(cfg)


def _train(steps: int, name: str) -> dict:
    import common as C
    out = C.fresh(C.DEFAULT_WORK / f"optim-{name}")
    cmd = [str(C.BIN / "distsft"), "run", str(C.ROOT / "examples" / "quickstart.yaml"), "--gpus", "2",
           f"train.max_steps={steps}", f"train.optim={name}", f"output_dir={out}", f"train.eval_steps={steps}",
           "logging.logging_steps=1", "logging.report_to=[jsonl]", "checkpoint.save_steps=100000"]
    run = C.run_logged(cmd, env=C.bench_env(DISTSFT_CACHE_DIR=str(C.DEFAULT_WORK / "distsft-cache")),
                       rank_pattern="distsft.train", timeout=3600)
    C.check(run, f"distsft {name}")
    recs = C.read_jsonl(out / "metrics.jsonl")
    losses = [r["loss"] for r in recs if "loss" in r]
    evals = [r["eval_loss"] for r in recs if "eval_loss" in r]
    return {"last5": sum(losses[-5:]) / 5, "eval": evals[-1], "first": losses[0], "steps": len(losses),
            "peak_rss": max(r.get("peak_memory_gb", 0) for r in recs if "loss" in r)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--skip-training", action="store_true")
    a = ap.parse_args()
    import common as C
    rows = []
    for label, model in _models():
        got = {name: _state_bytes(model, name) for name in OPTIMIZERS}
        rows.append((label, got))
    print(f"\n`{C.command_line()}`  ")
    print(f"{C.machine()}; {C.versions()}\n")
    print("| model | parameters | adamw_torch state B/param | adamw_8bit state B/param | 8-bit / torch |")
    print("|---|---|---|---|---|")
    for label, got in rows:
        (b32, n), (b8, _) = got["adamw_torch"], got["adamw_8bit"]
        print(f"| {label} | {n:,} | {b32 / n:.3f} | {b8 / n:.3f} | {b8 / b32:.3f}x |")
    if a.skip_training:
        return
    res = {name: _train(a.steps, name) for name in OPTIMIZERS}
    print(f"\nquickstart task, {a.steps} steps, 2 CPU ranks:\n")
    print("| optimizer | first loss | mean loss, last 5 steps | eval loss | vs adamw_torch (eval) |")
    print("|---|---|---|---|---|")
    ref = res["adamw_torch"]["eval"]
    for name, r in res.items():
        print(f"| {name} | {r['first']:.4f} | {r['last5']:.4f} | {r['eval']:.4f} | {100 * (r['eval'] / ref - 1):+.2f}% |")


if __name__ == "__main__":
    main()
