"""Item 7 of issue 14: evaluation never materialises a batch's full fp32 logits, and its loss is the
plain next-token cross-entropy."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import helpers as h
from distsft.train.eval_loss import token_loss_sum


def _model(vocab: int = 512, **cfg):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, **cfg)).eval()


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
        got, n = token_loss_sum(model, batch, labels, chunk_bytes=4 * 512 * 5)  # 5 positions a chunk
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


def test_soft_capped_logits_are_applied_like_the_model_does() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                           final_logit_softcapping=5.0)).eval()
    ids = torch.randint(0, 300, (2, 16))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        logits = model(**batch).logits.float()
        want = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1), reduction="sum")
        got, _ = token_loss_sum(model, batch, ids, chunk_bytes=4 * 300 * 7)
    assert torch.allclose(got, want, rtol=1e-5), (got, want)


PEAK = r"""
import json, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from distsft.train.eval_loss import token_loss_sum
V, L = 150_000, 1024
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
ids = torch.randint(0, V, (1, L))
with torch.no_grad():
    token_loss_sum(model, {"input_ids": ids[:, :8]}, ids[:, :8])  # warm up the allocator and kernels
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss, n = token_loss_sum(model, {"input_ids": ids}, ids, chunk_bytes=16 * 2**20)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"growth": after - before, "full_fp32_logits": L * V * 4, "n": n}))
"""


def test_eval_of_a_150k_vocabulary_stays_far_below_the_full_logits() -> None:
    """Peak RSS of a fresh process: the eval of one 1024-token row with a 150k vocabulary grows it by far
    less than that row's fp32 logits (614 MB), which the old eval materialised (twice: bf16/fp32)."""
    p = subprocess.run([sys.executable, "-c", PEAK], capture_output=True, text=True, env=h.env(), timeout=300)
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout.strip().splitlines()[-1])
    assert r["n"] == 1023
    assert r["growth"] < r["full_fp32_logits"] / 4, r
