"""Peak memory of an eval pass vs a training step, for a model with a 150k vocabulary at max_length 2048
(issue 14, item 7). Each measurement runs in a fresh process (peak RSS growth over the model's own
footprint; on CUDA it would be max_memory_allocated): a training step (forward with labels, backward,
AdamW step), distsft's eval (distsft.train.eval_loss.token_loss_sum: since issue 19 the model's forward
with TRL's fused LM head, the call training makes), and the eval it replaced (full logits, upcast to fp32,
one cross-entropy) for reference.

    PYTHONPATH=src python benchmarks/eval_memory.py [--vocab 150000] [--length 2048] [--batch 1]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from trl.trainer import add_fused_lm_head
from distsft.train.eval_loss import token_loss_sum
mode, V, L, B = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=L))
add_fused_lm_head(model)  # what TRL's SFTTrainer does; the plain forward (fused_lm_head=False) is unchanged
ids = torch.randint(0, V, (B, L))
labels = ids.clone(); labels[:, : L // 8] = -100  # a prompt without loss, as in SFT
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
def train():
    model.train(); loss = model(input_ids=ids, labels=labels).loss; loss.backward(); opt.step(); opt.zero_grad()
def eval_chunked():
    model.eval()
    with torch.no_grad(): token_loss_sum(model, {"input_ids": ids}, labels)
def eval_full():
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1), reduction="sum")
step = {"train": train, "eval": eval_chunked, "eval_full_logits": eval_full}[mode]
# Warm up on a short row (allocator, kernels, optimizer state) so that only the step's transient counts.
full = ids; ids = full[:, :16]; lab = labels; labels = lab[:, :16]; step(); ids, labels = full, lab
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
step()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"mode": mode, "peak_growth_gb": (after - before) / 2**30}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=150_000)
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    full_logits = a.batch * a.length * a.vocab * 4 / 2**30
    rows = []
    for mode in ("train", "eval", "eval_full_logits"):
        p = subprocess.run([sys.executable, "-c", CHILD, mode, str(a.vocab), str(a.length), str(a.batch)],
                           capture_output=True, text=True, check=True)
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
    print(f"vocab {a.vocab}, batch {a.batch} x length {a.length}: one batch's fp32 logits = {full_logits:.2f} GiB (CPU, fp32)")
    print(f"{'pass':<34}{'peak memory growth (GiB)':>26}")
    names = {"train": "training step (fwd+bwd+AdamW)", "eval": "eval, distsft (fused head)",
             "eval_full_logits": "eval, full fp32 logits (before)"}
    for r in rows:
        print(f"{names[r['mode']]:<34}{r['peak_growth_gb']:>26.2f}")
    train, ev = rows[0]["peak_growth_gb"], rows[1]["peak_growth_gb"]
    print(f"eval <= training step: {'yes' if ev <= train else 'NO'} ({ev / train:.1%} of the training step)")


if __name__ == "__main__":
    main()
