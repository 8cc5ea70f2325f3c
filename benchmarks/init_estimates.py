"""`distsft init`'s memory estimates, checked two ways (issue 23).

Part A, every bundled model: what `init` chooses for 1 node x 8 GPUs of 80 GB (full fine-tuning), and its
model-state estimate against DeepSpeed's own estimators for the same stage (`estimate_zero2_/zero3_model_
states_mem_needs`; DDP, which DeepSpeed does not estimate, against its ZeRO-2 figure on one GPU, i.e. no
partitioning). plan computes these byte counts itself (plan.zero_states) without importing DeepSpeed; the
ratio shows it stays DeepSpeed's number, and where distsft departs (DDP: 16 B/param, no 16-bit copy).

Part B, measured on this CPU: tiny random models of each architecture family (the bundled configs shrunk
to a few layers), one process, fp32, 3 optimizer steps of AdamW on packed rows; the measured peak
(VmHWM of the child process after the steps, minus its high-water mark before the model was built)
against plan.memory's estimate for DDP at that micro-batch and length (error %). The estimate counts
model states and activations only; the CPU attention kernels, the allocator and Python objects make up
the difference.

    python benchmarks/init_estimates.py [--part a|b|both] [--length 512] [--micro 4]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def part_a() -> None:
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from distsft.launch import init
    from distsft.plan import fit, memory, models
    print("| model | params | init's choice | micro | est. total GB/GPU | est. model states GB | DeepSpeed's GB | ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for stem in models.all_stems():
        _, raw, _ = init.build(stem, "full", nodes=1, gpus=8, gpu_memory_gb=80, out="/tmp/x.yaml")
        from distsft.config.spec import validate
        spec = validate(raw)
        shape = init.shape_of(init.resolve_model(stem))
        est = memory.estimate(spec, shape=shape)
        label = fit.spec_label(spec)
        n, big = shape.num_parameters, shape.largest_layer_parameters
        d = spec.distributed
        if d.stage == 3:
            _, ds, _ = estimate_zero3_model_states_mem_needs(n, big, 8, 1, cpu_offload=d.offload_optimizer,
                                                             cpu_offload_params=d.offload_params, zero_init=True)
        elif d.stage == 2:
            _, ds = estimate_zero2_model_states_mem_needs(n, 8, 1, cpu_offload=d.offload_optimizer)
        else:
            _, ds = estimate_zero2_model_states_mem_needs(n, 1, 1, cpu_offload=False)
        ours = est["model_states_gb"]
        ck = " + ckpt" if spec.train.gradient_checkpointing else ""
        print(f"| {stem} | {n / 1e9:.2f}B | {label}{ck} | {spec.train.per_device_train_batch_size} | "
              f"{est['total_gb']:.1f} | {ours:.1f} | {ds / GIB:.1f} | {ours / (ds / GIB):.3f} |")


CHILD = r"""
import json, resource, sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
raw, micro, length = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
torch.set_num_threads(1)
x = torch.randint(0, raw.get('vocab_size', raw.get('text_config', {}).get('vocab_size', 1000)) - 1, (micro, length))
before = hwm()
cfg = AutoConfig.for_model(**raw)
try:
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation='sdpa').float()
except ValueError:  # Gemma-2 (soft-capped attention) only offers eager
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation='eager').float()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
for _ in range(3):
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
print(json.dumps({'peak': hwm() - before}))
"""

TINY = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "vocab_size": 32000}
FAMILIES = ("llama-3.1-8b", "qwen2.5-7b", "qwen3-8b", "gemma-2-9b", "mistral-7b-v0.3", "phi-3.5-mini",
            "smollm2-135m", "qwen3-30b-a3b", "gpt-oss-20b")


def tiny_config(stem: str) -> dict:
    from distsft.plan import models
    raw = dict(models.lookup(stem).config)
    raw.update(TINY)
    raw.pop("quantization_config", None)  # MXFP4 needs a GPU kernel; the tiny copy trains in fp32
    raw.pop("rope_scaling", None)
    for k in ("bos_token_id", "eos_token_id", "pad_token_id"):  # ids of the real vocabulary
        raw[k] = None
    if "layer_types" in raw:
        raw["layer_types"] = raw["layer_types"][:TINY["num_hidden_layers"]]
    if raw.get("model_type") == "qwen3_moe":
        raw.update({"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 128})
    if raw.get("model_type") == "gpt_oss":
        raw.update({"num_local_experts": 8, "num_experts_per_tok": 2, "experts_per_token": 2})
    if raw.get("model_type") == "phi3":
        raw["num_key_value_heads"] = 4
    return raw


def part_b(length: int, micro: int, families: tuple[str, ...] = FAMILIES) -> None:
    from distsft.config.spec import validate
    from distsft.plan import memory
    from distsft.plan.memory import model_shape
    print(f"\nmicro-batch {micro} x {length} tokens, fp32, 1 CPU process, 3 AdamW steps\n")
    print("| tiny model (family) | params | estimate MB | measured peak MB | error |")
    print("|---|---|---|---|---|")
    for stem in families:
        raw = tiny_config(stem)
        shape = model_shape(stem, config=raw)
        spec = validate({"model": {"name_or_path": stem}, "data": {"train_files": ["x.jsonl"], "max_length": length},
                         "train": {"per_device_train_batch_size": micro, "bf16": False}})
        est = memory.estimate(spec, shape=shape)
        est_b = est["total_gb"] * GIB
        p = subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw), str(micro), str(length)],
                           capture_output=True, text=True, timeout=900)
        if p.returncode != 0:
            print(f"| {stem} | - | - | failed: {p.stderr.strip().splitlines()[-1][:80]} | - |")
            continue
        peak = json.loads(p.stdout.strip().splitlines()[-1])["peak"]
        print(f"| {stem} | {shape.num_parameters / 1e6:.1f}M | {est_b / 2**20:.0f} | {peak / 2**20:.0f} | "
              f"{(est_b - peak) / peak:+.0%} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=("a", "b", "both"), default="both")
    ap.add_argument("--length", type=int, default=512)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--families", default=",".join(FAMILIES), help="bundled stems to shrink and measure")
    a = ap.parse_args()
    if a.part in ("a", "both"):
        part_a()
    if a.part in ("b", "both"):
        part_b(a.length, a.micro, tuple(a.families.split(",")))


if __name__ == "__main__":
    main()
