"""The mfu metric: peak lookup by device name, trainable-aware FLOPs per token, the formula; CUDA only."""

from __future__ import annotations

import pytest
import torch

from distsft.observe import mfu


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A10G", 70.0), ("NVIDIA A10", 125.0), ("NVIDIA L40S", 362.0),
    ("NVIDIA L4", 121.0), ("Tesla T4", 65.0), ("AMD Instinct MI300X", 1307.0)])
def test_peak_by_device_name(name, peak):
    assert mfu.peak_tflops(name) == peak


def test_unknown_device_has_no_peak_unless_given():
    assert mfu.peak_tflops("Some Future GPU") is None
    assert mfu.peak_tflops("Some Future GPU", override=500.0) == 500.0
    assert mfu.peak_tflops("NVIDIA H100 PCIe", override=700.0) == 700.0  # the override wins


def test_formula():
    # full fine-tuning: 6N per token; a frozen base with a small adapter: 4N + 2 x trainable
    assert mfu.flops_per_token(1_000, 1_000) == 6_000
    assert mfu.flops_per_token(1_000, 10) == 4_020
    # 1B parameters, 6e9 FLOPs/token, 100k tokens/s over 8 GPUs of 989 TFLOP/s
    got = mfu.mfu(100_000, mfu.flops_per_token(10**9, 10**9), 8, 989.0)
    assert got == pytest.approx(6e9 * 1e5 / (8 * 989e12))


def test_parameter_count_is_trainable_aware(tiny_model_dir):
    from transformers import AutoModelForCausalLM
    from peft import LoraConfig, get_peft_model
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    every = sum(p.numel() for p in model.parameters())
    lookup = model.get_input_embeddings().weight.numel()
    assert mfu.count_parameters(model) == (every - lookup, every)  # untied: the input table is a lookup
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    total, trainable = mfu.count_parameters(lora)
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert trainable == adapters and total == every - lookup + adapters


def test_no_mfu_on_cpu(tiny_model_dir):
    assert mfu.meter(torch.nn.Linear(2, 2), 1, torch.device("cpu")) is None


@pytest.mark.gpu
def test_meter_on_cuda_gives_a_fraction(tiny_model_dir):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).cuda()
    f = mfu.meter(model, 1, torch.device("cuda"), override=100.0)
    total, trainable = mfu.count_parameters(model)
    assert f(1e6) == pytest.approx((4 * total + 2 * trainable) * 1e6 / 100e12)


def test_fp32_runs_are_measured_against_the_fp32_peak():
    """Issue 19 item 14: an fp32 run on an H100 compared with the bf16 peak reads half its real MFU."""
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3", precision="no") == 989.0 / 2  # TF32, on by distsft
    assert mfu.peak_tflops("NVIDIA A100-SXM4-80GB", precision="no") == 156.0
    assert mfu.peak_tflops("Tesla V100-SXM2-32GB", precision="no") == 15.7  # no TF32
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3", precision="bf16") == 989.0
    assert mfu.peak_tflops("Some Future GPU", precision="no") is None
    assert mfu.peak_tflops("NVIDIA H100 80GB HBM3", override=300.0, precision="no") == 300.0
