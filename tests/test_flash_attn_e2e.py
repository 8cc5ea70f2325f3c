"""Issue 19 items 1, 13, 14 end to end: `distsft run` on a sliding-window Mistral (window 8, shorter than
most examples), packed, with eval -- on the flash-attn stand-in with fp32 master weights under bf16
autocast (before issue 19 the first eval crashed: the eval called the decoder outside autocast), and
on sdpa in fp32 (before, the sliding layers trained and evaluated with full causal attention). At a
learning rate of 0 the logged eval_loss equals each eval example run alone (1e-5); every step logs the
global batch's 8 rows as `samples` (flash attention concatenates a micro-batch into one row)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers as h

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent

REFERENCE = r'''
import json, sys, torch
from transformers import AutoModelForCausalLM
import sliding_models as sm
from distsft.config.spec import load_spec
from distsft.data import build as data
from distsft.data.split import cache_root
from distsft.train.tokens import load_tokenizer
spec = load_spec(sys.argv[1])
attn, autocast = sys.argv[2], sys.argv[2] == "flash_attention_2"
ds, _ = data.load_or_build(spec, load_tokenizer(spec), "eval", cache_root(spec))
model = AutoModelForCausalLM.from_pretrained(spec.model.name_or_path, attn_implementation=attn, dtype=torch.float32).eval()
no_window = AutoModelForCausalLM.from_pretrained(spec.model.name_or_path, attn_implementation=attn, dtype=torch.float32,
                                                 sliding_window=None).eval()
rows = [ds[i] for i in range(len(ds))]
print(json.dumps({"reference": sm.reference_loss(model, rows, autocast=autocast),
                  "no_window": sm.reference_loss(no_window, rows, autocast=autocast)}))
'''


def _mistral(path: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM
    tok = AutoTokenizer.from_pretrained(h.TINY)
    cfg = MistralConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, sliding_window=8, initializer_range=0.1,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    MistralForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("attn,bf16", [("flash_attention_2", "true"), ("sdpa", "false")])
def test_sliding_window_mistral_trains_and_evaluates_packed(tmp_path, attn, bf16):
    model_dir = _mistral(tmp_path / "mistral-sw")
    out = tmp_path / "run"
    env = h.env()
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "shims" / "flash_attn"), str(TESTS), env.get("PYTHONPATH", "")])
    spec = h.write_spec(tmp_path / "spec.yaml", out)
    p = subprocess.run([*h.DISTSFT, "run", str(spec), "--gpus", "2", f"model.name_or_path={model_dir}",
                        f"model.attn_implementation={attn}", f"train.bf16={bf16}", "train.learning_rate=0.0",
                        "train.max_steps=4", "train.eval_steps=4"], capture_output=True, text=True, env=env, timeout=900)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert f"attention {attn}" in p.stdout
    metrics = h.metrics(out)
    steps = [m for m in metrics if "loss" in m]
    assert len(steps) == 4 and all(m["samples"] == 8 for m in steps), [m.get("samples") for m in steps]
    logged = [m["eval_loss"] for m in metrics if "eval_loss" in m][-1]
    r = subprocess.run([sys.executable, "-c", REFERENCE, str(out / "run.yaml"), attn], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.loads(r.stdout.strip().splitlines()[-1])
    assert logged == pytest.approx(ref["reference"], abs=1e-5), (logged, ref)
    assert abs(ref["no_window"] - ref["reference"]) > 1e-3, ref  # the window matters on this data
