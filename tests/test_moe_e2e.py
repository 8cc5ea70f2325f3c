"""Mixture-of-experts end to end: tiny random Qwen3-MoE, Mixtral and gpt-oss train on every backend
(DDP, ZeRO-2, ZeRO-3, FSDP2), full and LoRA, on 2 CPU processes over gloo; the loss options change
what they should and nothing else. Runs are few and each is asserted on several ways.

Coverage of the backend matrix (family, backend, method):
  qwen3_moe ddp full · qwen3_moe zero3 lora(+experts, labelled sources) · qwen3_moe fsdp full ·
  mixtral zero2 lora · mixtral zero2 full · mixtral fsdp lora · gpt_oss zero3 full · gpt_oss ddp lora
"""

from __future__ import annotations

import math
import sys

import pytest
import torch

import helpers as h

sys.path.insert(0, str(h.ROOT / "examples"))
import make_tiny_moe  # noqa: E402

pytestmark = pytest.mark.slow

BACKENDS = {"ddp": "distributed:\n  backend: ddp\n",
            "zero2": "distributed:\n  backend: deepspeed\n  zero_stage: 2\n",
            "zero3": "distributed:\n  backend: deepspeed\n  zero_stage: 3\n",
            "fsdp": "distributed:\n  backend: fsdp\n"}
# Every family and backend at least once, full and LoRA (DDP full: experts a rank's tokens skip get no
# gradient there; ZeRO-3 LoRA is in the shared run below).
MATRIX = [("qwen3_moe", "ddp", "none"), ("mixtral", "zero2", "lora"), ("mixtral", "fsdp", "lora"),
          ("gpt_oss", "zero3", "none"), ("gpt_oss", "ddp", "lora")]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-models")
    return {f: make_tiny_moe.build(root / f, f) for f in ("qwen3_moe", "mixtral", "gpt_oss", "dense")}


def _spec(tmp_path, model, backend, extra=""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    out = tmp_path / "run"
    spec = h.write_spec(tmp_path / "spec.yaml", out, BACKENDS[backend] + extra)
    spec.write_text(spec.read_text().replace(str(h.TINY), str(model)))
    return spec, out


def _assert_trained(out, steps=3):
    m = [r for r in h.metrics(out) if "loss" in r]
    assert [r["step"] for r in m] == list(range(1, steps + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["aux_loss"]) for r in m), m
    return m


@pytest.mark.parametrize("family,backend,method", MATRIX)
def test_moe_trains_on_every_backend(tmp_path, models, family, backend, method):
    """No hang (ZeRO-3 leaf blocks, FSDP2 units per decoder layer), finite LM and router losses, and the
    logged loss is the LM loss alone: within the run it falls at a high learning rate."""
    spec, out = _spec(tmp_path, models[family], backend)
    h.run("run", spec, "--gpus", "2", f"peft.method={method}", "train.max_steps=3",
          "train.learning_rate=" + ("1e-2" if method != "none" else "3e-3"), check=True, timeout=500)
    m = _assert_trained(out)
    assert m[-1]["loss"] < m[0]["loss"]


def test_zero3_lora_experts_labelled_sources_and_reload(tmp_path, models):
    """One ZeRO-3 LoRA run on Qwen3-MoE with expert adapters and two labelled sources: the adapter holds
    expert LoRA and no router LoRA, reloads with the same eval loss; loss_<label> are token-weighted
    parts of loss; aux_loss is logged."""
    from safetensors.torch import load_file
    extra = (f"data:\n  sources:\n    - path: {h.TRAIN}\n      label: chat\n      count: 600\n"
             f"    - path: {h.ROOT / 'examples/data/instruct.jsonl'}\n      format: instruction\n      label: instr\n"
             f"  eval_files: {h.EVAL}\n  max_length: 256\n")
    spec, out = _spec(tmp_path, models["qwen3_moe"], "zero3")
    text = spec.read_text()
    text = text[:text.index("data:")] + extra + text[text.index("train:"):]
    spec.write_text(text)
    h.run("run", spec, "--gpus", "2", "peft.method=lora", "peft.r=4", "train.max_steps=3",
          "peft.target_parameters=[experts.gate_up_proj,experts.down_proj]", "train.router_aux_loss_coef=0.5",
          "train.learning_rate=1e-2", "train.eval_steps=3", check=True, timeout=500)
    m = _assert_trained(out)
    for r in m:
        parts = [(r[f"loss_{k}"], r[f"loss_tokens_{k}"]) for k in ("chat", "instr") if f"loss_{k}" in r]
        assert parts and sum(t for _, t in parts) == pytest.approx(r["loss_tokens"])
        assert sum(v * t for v, t in parts) / r["loss_tokens"] == pytest.approx(r["loss"], rel=1e-6)
    assert any("loss_instr" in r for r in m) and any("loss_chat" in r for r in m)
    adapter = load_file(out / "adapter_model.safetensors")
    assert any(".experts." in k for k in adapter)
    assert not any(".mlp.gate." in k for k in adapter)
    reported = [r["eval_loss"] for r in h.metrics(out) if "eval_loss" in r][-1]
    assert _reloaded_eval_loss(out, models["qwen3_moe"]) == pytest.approx(reported, abs=1e-4)


def _reloaded_eval_loss(out, base):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distsft.config.spec import load_spec
    from distsft.data import build as data
    from distsft.data.split import cache_root
    spec = load_spec(out / "run.yaml")
    tok = AutoTokenizer.from_pretrained(base)
    ds, _ = data.load_or_build(spec, tok, "eval", cache_root(spec))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), out).eval()
    return h.packed_eval_loss(model, ds, tok.pad_token_id)


def test_loss_options_change_the_gradients_not_the_logged_loss(tmp_path, models):
    """One process each, the same data and weights: the router coefficient and DFT change the update
    (grad_norm at step 1, and so the loss at step 2) but not the logged LM loss of step 1; NEFTune
    changes the step-1 loss (noisy embeddings in training) but not the eval loss before any update."""
    runs = {"base": ["train.router_aux_loss_coef=0"], "aux": ["train.router_aux_loss_coef=1.0"],
            "dft": ["train.router_aux_loss_coef=0", "train.loss_type=dft"],
            "neft": ["train.router_aux_loss_coef=0", "train.neftune_noise_alpha=50"]}
    got = {}
    for name, over in runs.items():
        spec, out = _spec(tmp_path / name, models["qwen3_moe"], "ddp")
        # no warmup: step 1 updates the weights (its learning rate would be 0 otherwise)
        h.run("run", spec, "--gpus", "1", "train.max_steps=2", "train.global_batch_size=4", "train.warmup_ratio=0",
              "train.learning_rate=1e-2", *over, check=True, timeout=300)
        got[name] = {r["step"]: r for r in h.metrics(out) if "loss" in r}
    base = got["base"]
    for name in ("aux", "dft"):
        assert got[name][1]["loss"] == pytest.approx(base[1]["loss"], rel=1e-6), name
        assert got[name][1]["grad_norm"] != pytest.approx(base[1]["grad_norm"], rel=1e-4), name
        assert got[name][2]["loss"] != pytest.approx(base[2]["loss"], rel=1e-6), name
    assert got["aux"][1]["aux_loss"] == pytest.approx(base[1]["aux_loss"], rel=1e-6)
    assert got["neft"][1]["loss"] != pytest.approx(base[1]["loss"], rel=1e-4)
    # the logged token counts (global-batch weighting) are the same under every option
    assert {n: g[1]["loss_tokens"] for n, g in got.items()} == {n: base[1]["loss_tokens"] for n in got}


@pytest.mark.parametrize("over,key", [
    (["train.router_aux_loss_coef=0.1"], "train.router_aux_loss_coef"),
    (["peft.method=lora", "peft.target_parameters=[experts.w9]"], "peft.target_parameters"),
    (["train.loss_type=mse"], "train.loss_type"),
])
def test_bad_moe_and_loss_options_exit_2_naming_the_key(tmp_path, models, over, key):
    model = models["dense"] if key == "train.router_aux_loss_coef" else models["qwen3_moe"]
    spec, _ = _spec(tmp_path, model, "ddp")
    p = h.run("run", spec, "--gpus", "1", "train.max_steps=1", *over, timeout=300)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-3000:]
    assert key in p.stdout + p.stderr
    assert "Traceback" not in p.stderr


def test_moe_with_every_loss_option_resumes_exactly(tmp_path, models):
    """Qwen3-MoE with the router loss, DFT, NEFTune and two labelled sources: preempted after step 2
    and rerun, every logged figure of every step (loss, aux_loss, loss_<label>) equals the uninterrupted
    run's -- NEFTune's noise included (its generator state travels with the checkpoint)."""
    import signal

    from distsft.checkpoint.preempt import EXIT_PREEMPTED
    steps = 5
    extra = (f"data:\n  sources:\n    - path: {h.TRAIN}\n      label: chat\n      count: 300\n"
             f"    - path: {h.ROOT / 'examples/data/instruct.jsonl'}\n      format: instruction\n      label: instr\n"
             f"  max_length: 256\n")
    over = [f"train.max_steps={steps}", "train.loss_type=dft", "train.neftune_noise_alpha=5",
            "train.router_aux_loss_coef=0.1", "checkpoint.save_steps=100", "train.global_batch_size=4"]
    runs = {}
    for name in ("straight", "resumed"):
        spec, out = _spec(tmp_path / name, models["qwen3_moe"], "ddp")
        text = spec.read_text()
        spec.write_text(text[:text.index("data:")] + extra + text[text.index("train:"):])
        if name == "resumed":
            proc = h.start("run", spec, "--gpus", "1", *over)
            h.wait_for_step(out, 2, proc)
            proc.send_signal(signal.SIGUSR1)
            assert proc.wait(timeout=180) == EXIT_PREEMPTED
        h.run("run", spec, "--gpus", "1", *over, check=True, timeout=400)
        runs[name] = {r["step"]: r for r in h.metrics(out) if "loss" in r}
    assert sorted(runs["resumed"]) == list(range(1, steps + 1))
    for step, ref in runs["straight"].items():
        got = runs["resumed"][step]
        for key in ("loss", "aux_loss", "loss_chat", "loss_instr", "loss_tokens_chat"):
            if key in ref:
                assert got[key] == pytest.approx(ref[key], abs=1e-5), (step, key)


@pytest.mark.parametrize("backend,gpus", [("ddp", "1"), ("fsdp", "2")])
def test_qlora_on_moe_quantizes_the_experts_or_says_what_they_cost(tmp_path, models, backend, gpus):
    """QLoRA on Qwen3-MoE: unsharded, the experts are quantized too (said, with the bytes saved);
    sharded (FSDP2) they stay bf16 and the run says so loudly, with their size. Both train."""
    spec, out = _spec(tmp_path, models["qwen3_moe"], backend)
    p = h.run("run", spec, "--gpus", gpus, "peft.method=qlora", "peft.r=4", "train.max_steps=2",
              "train.learning_rate=1e-2", check=True, timeout=500)
    text = p.stdout + p.stderr
    if backend == "ddp":
        assert "routed experts quantized to 4 bits" in text
    else:
        assert "QLoRA: the routed experts stay in 16 bits (sharded QLoRA" in text and "GiB" in text
    m = [r for r in h.metrics(out) if "loss" in r]
    assert [r["step"] for r in m] == [1, 2] and all(math.isfinite(r["loss"]) for r in m)
