"""Tiny random mixture-of-experts models (and a dense model of the same active size) for tests and
benchmarks, built from configs: nothing is downloaded. Each uses the tiny-llama tokenizer, so they
read the same data as examples/tiny-llama.

    python examples/make_tiny_moe.py OUT_DIR [--family qwen3_moe|mixtral|gpt_oss|dense] [--seed N]

Families (transformers 5.x classes): Qwen3-MoE (fused 3-D experts, top-k router `mlp.gate`), Mixtral
(the same layout, sliding-window attention off by default), gpt-oss (biased experts and router
`mlp.router`, attention sinks, alternating sliding / full attention layers). `dense` is a Llama whose
MLP has the active size of the MoE (num_experts_per_tok × moe_intermediate_size), the baseline of the
step-time benchmark.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOKENIZER_DIR = HERE / "tiny-llama"
FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "dense")
# Shared shape: 2 layers, hidden 64, 8 experts of width 32, 2 active per token.
HIDDEN, LAYERS, EXPERTS, TOP_K, EXPERT_WIDTH = 64, 2, 8, 2, 32


def config(family: str, vocab_size: int, pad: int, bos: int, eos: int, **overrides):
    common = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=1024, pad_token_id=pad,
                  bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=False, rms_norm_eps=1e-6)
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        cfg = Qwen3MoeConfig(**common, intermediate_size=4 * EXPERT_WIDTH, moe_intermediate_size=EXPERT_WIDTH,
                             num_experts=EXPERTS, num_experts_per_tok=TOP_K, decoder_sparse_step=1,
                             norm_topk_prob=True, router_aux_loss_coef=0.001)
    elif family == "mixtral":
        from transformers import MixtralConfig
        cfg = MixtralConfig(**common, intermediate_size=EXPERT_WIDTH, num_local_experts=EXPERTS,
                            num_experts_per_tok=TOP_K, router_aux_loss_coef=0.02)
    elif family == "gpt_oss":
        from transformers import GptOssConfig
        cfg = GptOssConfig(**common, intermediate_size=EXPERT_WIDTH, num_local_experts=EXPERTS,
                           num_experts_per_tok=TOP_K, sliding_window=8, router_aux_loss_coef=0.9,
                           layer_types=["sliding_attention", "full_attention"][:LAYERS])
    elif family == "dense":
        from transformers import LlamaConfig
        cfg = LlamaConfig(**common, intermediate_size=TOP_K * EXPERT_WIDTH)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def build(out: Path | str, family: str = "qwen3_moe", seed: int = 0, **overrides) -> Path:
    """Write a tiny random `family` model and the tiny-llama tokenizer to `out`; returns `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    cfg = config(family, len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    model.save_pretrained(out)
    for f in TOKENIZER_DIR.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
    return out


def build_mxfp4(out: Path | str, seed: int = 0) -> Path:
    """A tiny gpt-oss checkpoint stored as the released gpt-oss models are: routed experts in MXFP4
    (`*_blocks`: two FP4 E2M1 values a byte, 32 per block; `*_scales`: one E8M0 exponent per block,
    biased by 127), `quantization_config: {quant_method: mxfp4}` in config.json. Random codes, small
    scales (2^-5) so the dequantized weights are of the usual magnitude."""
    import json

    import torch
    from safetensors.torch import load_file, save_file
    out = build(out, "gpt_oss", seed)
    weights = load_file(out / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for key in [k for k in weights if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        w = weights.pop(key)  # [E, in, out]: stored transposed, 32 inputs a block
        E, n_in, n_out = w.shape
        weights[key + "_blocks"] = torch.randint(0, 256, (E, n_out, n_in // 32, 16), dtype=torch.uint8, generator=g)
        weights[key + "_scales"] = torch.full((E, n_out, n_in // 32), 127 - 5, dtype=torch.uint8)
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--family", default="qwen3_moe", choices=FAMILIES)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    print(build(a.out, a.family, a.seed))


if __name__ == "__main__":
    main()
