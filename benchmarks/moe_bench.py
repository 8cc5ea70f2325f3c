"""Mixture-of-experts figures (issue 21), printed as tables.

1. qlora  -- loaded weight bytes of a Qwen3-MoE under QLoRA: bitsandbytes' own 4-bit loading (it
             quantizes nn.Linear only; the fused 3-D experts stay bf16) against distsft's (experts
             quantized too, train/moe.py quantize_experts). Measured on the tiny model and on a small
             random one (the experts' share grows with the model); a projection for Qwen3-30B-A3B's
             shape is computed on the meta device (no weights), not measured.
2. steps  -- step time of the tiny Qwen3-MoE against a dense Llama of the same active size (its MLP is
             num_experts_per_tok × moe_intermediate_size wide), `distsft run` on 2 CPU ranks, every
             backend, full fine-tuning; median step_time of steps 2..N from metrics.jsonl. Runs alternate
             MoE / dense per backend (the machine is shared).
3. memory -- plan's per-GPU estimate (plan.memory.estimate, DDP, fp32 full fine-tuning, one process)
             against a measurement in this process: bytes of weights + gradients + Adam states after one
             optimizer step, plus the bytes autograd saved for the backward of one micro-batch (unique
             storages, via saved_tensors_hooks) and the fp32 logits. The estimate's error in %.

    python benchmarks/moe_bench.py [--only qlora|steps|memory] [--steps 6]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import make_tiny_moe  # noqa: E402

WORK = Path(tempfile.gettempdir()) / "distsft-bench" / "moe"
GIB = 2**30


def _mib(n: float) -> str:
    return f"{n / 2**20:.3f}"


# --------------------------------------------------------------------------- 1. QLoRA bytes

def qlora_bytes(path: Path) -> tuple[dict[str, int], dict[str, int]]:
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from distsft.train import moe
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, dtype=torch.bfloat16,
                                                 device_map={"": "cpu"})
    before = moe.loaded_bytes(model)
    moe.quantize_experts(model)
    return before, moe.loaded_bytes(model)


def projected_30b() -> tuple[int, int]:
    """(expert parameters, other parameters) of Qwen3-30B-A3B's shape, on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    from distsft.config.moe import is_expert_parameter
    cfg = Qwen3MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                         num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                         num_experts=128, num_experts_per_tok=8, tie_word_embeddings=False)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(cfg)
    exp = sum(p.numel() for n, p in model.named_parameters() if is_expert_parameter(n))
    return exp, sum(p.numel() for p in model.parameters()) - exp


def section_qlora() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    models = {"tiny Qwen3-MoE (8 experts, h64)": make_tiny_moe.build(WORK / "qwen3_moe", "qwen3_moe"),
              "small Qwen3-MoE (32 experts, h512, 4 layers)": make_tiny_moe.build(
                  WORK / "qwen3_moe_small", "qwen3_moe", hidden_size=512, num_hidden_layers=4, num_experts=32,
                  moe_intermediate_size=256, intermediate_size=1024, head_dim=64, num_attention_heads=8)}
    print("\n## QLoRA: loaded weight bytes (MiB)\n")
    print("| model | bnb 4-bit (before): experts / total | distsft (after): experts / total | expert share before | total after/before |")
    print("|---|---|---|---|---|")
    for name, path in models.items():
        b, a = qlora_bytes(path)
        tb, ta = b["experts"] + b["other"], a["experts"] + a["other"]
        print(f"| {name} | {_mib(b['experts'])} / {_mib(tb)} | {_mib(a['experts'])} / {_mib(ta)} | "
              f"{b['experts'] / tb:.0%} | {ta / tb:.2f}× |")
    exp, other = projected_30b()
    # bf16 experts vs NF4 + double-quantized constants (~0.53 byte/weight); the rest: linear layers
    # NF4, embeddings/norms bf16 -- approximated as all other weights at bnb's 4-bit rate except embeddings.
    print(f"\nProjection, Qwen3-30B-A3B's shape (meta device, {exp / 1e9:.1f}B expert + {other / 1e9:.1f}B other "
          f"parameters): experts {exp * 2 / GIB:.1f} GiB in bf16 vs {exp * 0.53 / GIB:.1f} GiB in NF4.")


# --------------------------------------------------------------------------- 2. step time

BACKENDS = {"ddp": "  backend: ddp\n", "zero2": "  backend: deepspeed\n  zero_stage: 2\n",
            "zero3": "  backend: deepspeed\n  zero_stage: 3\n", "fsdp": "  backend: fsdp\n"}


def _spec(path: Path, model: Path, out: Path, backend: str, steps: int) -> Path:
    path.write_text(f"""model:
  name_or_path: {model}
data:
  train_files: {ROOT / 'examples/data/train.jsonl'}
  max_length: 256
train:
  per_device_train_batch_size: 2
  global_batch_size: 8
  max_steps: {steps}
  learning_rate: 1.0e-3
  bf16: false
distributed:
{BACKENDS[backend]}logging:
  logging_steps: 1
checkpoint:
  save_steps: 1000
output_dir: {out}
""")
    return path


def median_step(model: Path, backend: str, steps: int, tag: str) -> float:
    out = WORK / f"run-{tag}-{backend}"
    spec = _spec(WORK / f"{tag}-{backend}.yaml", model, out, backend, steps)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    p = subprocess.run([sys.executable, "-m", "distsft.cli", "run", str(spec), "--gpus", "2"],
                       capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        raise SystemExit(f"{tag} {backend} failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return statistics.median(r["step_time"] for r in rows if "step_time" in r and r["step"] >= 2)


def section_steps(steps: int) -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    moe_dir = make_tiny_moe.build(WORK / "qwen3_moe", "qwen3_moe")
    dense_dir = make_tiny_moe.build(WORK / "dense", "dense")
    print(f"\n## Step time, tiny Qwen3-MoE vs dense of the same active size (2 CPU ranks, median of steps 2..{steps})\n")
    print("| backend | MoE s/step | dense s/step | MoE / dense |")
    print("|---|---|---|---|")
    for backend in BACKENDS:
        m = median_step(moe_dir, backend, steps, "moe")
        d = median_step(dense_dir, backend, steps, "dense")
        print(f"| {backend} | {m:.3f} | {d:.3f} | {m / d:.2f}× |", flush=True)


# --------------------------------------------------------------------------- 3. memory estimate

def measured_bytes(model_dir: Path, micro: int, length: int) -> dict[str, int]:
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.output_router_logits = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(5, 500, (micro, length))
    seen: dict[int, int] = {}

    def pack(t):
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    states = sum(p.numel() * p.element_size() for p in model.parameters())
    states += sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    states += sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
                  if isinstance(t, torch.Tensor) and t.dim() > 0)
    return {"model_states": states, "activations": sum(seen.values())}


def section_memory() -> None:
    """The estimate's own byte figures (plan rounds to 0.01 GiB, coarser than these models)."""
    from distsft.plan import memory
    WORK.mkdir(parents=True, exist_ok=True)
    models = {"tiny Qwen3-MoE": make_tiny_moe.build(WORK / "qwen3_moe", "qwen3_moe"),
              "small Qwen3-MoE (h256, 16 experts × 128, 4 layers)": make_tiny_moe.build(
                  WORK / "qwen3_moe_mem", "qwen3_moe", hidden_size=256, num_hidden_layers=4, num_experts=16,
                  moe_intermediate_size=128, intermediate_size=512),
              "tiny dense (same active size)": make_tiny_moe.build(WORK / "dense", "dense")}
    from distsft.config.moe import MoE
    big = memory.ModelShape(30_500_000_000, 0, 2048, 48, 151936, (), 29_000_000_000, MoE(128, 8, 0.001, True), (), 48)
    print(f"\nActivation values per hidden unit per token and layer, Qwen3-30B-A3B's shape: "
          f"{memory.act_values_per_hidden(big):.1f} (MoE-aware) vs {memory.ACT_VALUES_PER_HIDDEN} (dense MLP assumed)")
    print("\n## Memory: plan's estimate vs measured (one process, fp32 full fine-tuning, DDP)\n")
    print("| model | micro × length | estimate states / act. (MiB) | measured states / act. (MiB) | error, total | before (dense-MLP activations) |")
    print("|---|---|---|---|---|---|")
    for name, path in models.items():
        shape = memory.model_shape(str(path))
        states = memory.trainable_states_bytes(shape.num_parameters, shape.largest_layer_parameters, 0, False,
                                               False, 1, 1)[0]
        for micro, length in ((2, 256), (4, 512)):
            act = memory.activation_bytes(shape, micro, length, False, 4)
            dense_act = memory.activation_bytes(dataclasses.replace(shape, moe=None), micro, length, False, 4)
            got = measured_bytes(path, micro, length)
            e_tot, m_tot = states + act, got["model_states"] + got["activations"]
            before = 100 * (states + dense_act - m_tot) / m_tot
            print(f"| {name} | {micro} × {length} | {_mib(states)} / {_mib(act)} | "
                  f"{_mib(got['model_states'])} / {_mib(got['activations'])} | {100 * (e_tot - m_tot) / m_tot:+.0f}% | "
                  f"{before:+.0f}% |",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=("qlora", "steps", "memory"))
    ap.add_argument("--steps", type=int, default=6)
    a = ap.parse_args()
    if a.only in (None, "qlora"):
        section_qlora()
    if a.only in (None, "memory"):
        section_memory()
    if a.only in (None, "steps"):
        section_steps(a.steps)
    print(f"\ncommand: python benchmarks/moe_bench.py{' --only ' + a.only if a.only else ''} --steps {a.steps}")


if __name__ == "__main__":
    main()
