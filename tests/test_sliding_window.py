"""Issue 19 item 13: sliding-window layers keep their window on every packed attention path.

Tiny Mistral (sliding_window 4 < every example) and Gemma-2 / Gemma-3 (sliding and full layers
alternating), packed by distsft's collator and evaluated by distsft's eval loss, on sdpa, eager and the
flash-attn stand-in: the loss equals each example run alone (1e-5), and differs from the same weights
without a window, so a path that drops the window fails here."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers as h
import sliding_models as sm

TESTS = Path(__file__).resolve().parent
CASES = [(name, attn) for name, (_, _, _, attns) in sm.MODELS.items() for attn in attns if attn != "flash_attention_2"]


@pytest.mark.parametrize("name,attn", CASES)
def test_packed_eval_loss_equals_each_example_alone(name, attn):
    data = sm.rows()
    model = sm.build(name, attn)
    assert model.config._attn_implementation == attn
    packed = sm.packed_eval_loss(model, data, attn)
    reference = sm.reference_loss(model, data)
    assert packed == pytest.approx(reference, abs=1e-5)
    # The window matters for these examples: without it the same weights give another loss.
    assert abs(sm.reference_loss(sm.build(name, attn, window=None), data) - reference) > 1e-3


def test_the_collator_leaves_the_packed_masks_to_the_model():
    """No prebuilt [B, 1, L, L] mask (it reached the sliding layers unchanged, and cost O(L^2) host memory
    per micro-batch): positions restart at every example and the model derives per-layer-type masks."""
    from distsft.data.collate import PackedCollator
    batch = PackedCollator(sm.PAD, "sdpa", pad_to_multiple_of=8)(sm.rows())
    assert "attention_mask" not in batch
    assert batch["use_cache"] is False  # transformers derives packed masks only without a cache
    assert batch["position_ids"][0, :24].tolist() == [*range(7), *range(12), *range(5)]
    assert batch["position_ids"][1, 26:32].tolist() == [*range(6)]  # padding restarts: a sequence of its own


def test_flash_attention_standin_keeps_windows_on_varlen():
    env = h.env()
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS / "shims" / "flash_attn"), str(TESTS), env.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, str(TESTS / "sliding_models.py")], capture_output=True, text=True, env=env,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    results = json.loads(p.stdout.strip().splitlines()[-1])
    for name, r in results.items():
        assert r["attn"] == "flash_attention_2", name
        assert r["packed"] == pytest.approx(r["reference"], abs=1e-5), (name, r)
        assert abs(r["no_window_reference"] - r["reference"]) > 1e-3, (name, r)
