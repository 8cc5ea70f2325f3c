"""Item 7 of issue 14: evaluation never materialises a batch's full fp32 logits, and its loss is the
plain next-token cross-entropy. Since issue 19 the eval runs through TRL's fused LM head -- the forward
training uses -- so the head's output multipliers and soft caps are training's (item 16)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import helpers as h
from trl.trainer import add_fused_lm_head

from distsft.train.eval_loss import token_loss_sum


def _model(vocab: int = 512, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, **cfg)).eval()
    return model


@pytest.mark.parametrize("cfg", [{}, {"tie_word_embeddings": True}])
def test_chunked_eval_loss_equals_the_full_cross_entropy(cfg) -> None:
    model = _model(**cfg)
    ids = torch.randint(0, 512, (3, 40))
    labels = ids.clone()
    labels[:, :7] = -100
    labels[1, 20:] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = model(**batch).logits.float()
        want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), labels[:, 1:].reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        add_fused_lm_head(model)  # what TRL's SFTTrainer does to the model it trains
        got, n = token_loss_sum(model, batch, labels)
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


def _own_loss(model, ids, labels, vocab):
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1),
                                             ignore_index=-100, reduction="sum")


HEADS = {  # architectures whose forward changes the head's output, and how
    "gemma2-softcap": ("Gemma2ForCausalLM", "Gemma2Config", {"head_dim": 8, "final_logit_softcapping": 5.0}),
    "falcon_h1-lm_head_multiplier": ("FalconH1ForCausalLM", "FalconH1Config", {
        "lm_head_multiplier": 3.5, "mamba_d_ssm": 64, "mamba_n_heads": 4, "mamba_d_head": 16, "mamba_d_state": 16,
        "mamba_n_groups": 1, "mamba_chunk_size": 16, "eos_token_id": 2}),
    "granite-logits_scaling": ("GraniteForCausalLM", "GraniteConfig", {"logits_scaling": 0.25}),
    "cohere-logit_scale": ("CohereForCausalLM", "CohereConfig", {"logit_scale": 4.0}),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_the_head_is_applied_like_the_model_does(name):
    """Falcon-H1's lm_head_multiplier was missing from distsft's own eval before issue 19 (item 16)."""
    import transformers
    cls, cfg_cls, extra = HEADS[name]
    cfg = getattr(transformers, cfg_cls)(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(cfg).eval()
    ids = torch.randint(0, 300, (2, 16))
    labels = ids.clone()
    labels[:, :4] = -100
    want = _own_loss(model, ids, labels, 300)
    add_fused_lm_head(model)
    with torch.no_grad():
        got, n = token_loss_sum(model, {"input_ids": ids}, labels)
    assert n == 2 * 12
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


PEAK = r"""
import json, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer import add_fused_lm_head
from distsft.train.eval_loss import token_loss_sum
V, L = 600_000, 256
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
add_fused_lm_head(model)
ids = torch.randint(0, V, (1, L))
with torch.no_grad():
    token_loss_sum(model, {"input_ids": ids[:, :8]}, ids[:, :8])  # warm up the allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss, n = token_loss_sum(model, {"input_ids": ids}, ids)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": after - before, "full_fp32_logits": L * V * 4, "n": n}))
"""


def test_eval_of_a_600k_vocabulary_stays_far_below_the_full_logits() -> None:
    """Peak RSS of a fresh process: the eval of one 256-token row with a 600k vocabulary grows it by well
    under that row's fp32 logits (614 MB): TRL's head works in tiles of 32,768 vocabulary entries (on a
    CPU its torch fallback keeps a few tile-sized temporaries, ~190 MB here; on a GPU one bf16 tile)."""
    p = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, env=h.env(), timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["n"] == 255
    assert r["growth"] < r["full_fp32_logits"] / 2, r
